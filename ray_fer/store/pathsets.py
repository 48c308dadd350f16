"""Sets of paths too large for one process: 128-bit keys, order-free digests, repeats, membership.

A store of 100 million files has about 10 GB of path strings: no driver can hold them, and a
hash shuffle (`Dataset.join`, `groupby`) moves them all over the network and waits for the
whole input before its first row. Instead every path becomes a 128-bit key (two independent
64-bit SipHashes, 16 bytes), and:

- `Digest` sums keys modulo 2**64 per half, with a count: the digest of a set is the sum of its
  blocks' digests, in any order, so Ray tasks digest their own blocks and the driver adds a few
  numbers. Two multisets with equal digests are equal but with a chance of about 2**-64: this
  is how a run checks that its rows hold each path it was asked to label exactly once.
- `Tally` is the actor the pipeline's tasks report their blocks' digests to. A block's digest
  is also its identity, so a task that Ray retries reports the same block again, not twice.
- `find_repeats` sorts the keys of many files (16 bytes a row: 1.6 GB for 100 million) in one
  task and returns the repeated keys with the position of their first occurrence.
- `contains` tests keys against a sorted key array in the object store: the anti-join of
  --skip-existing, streaming, with no shuffle (a false match needs a 128-bit collision).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

KEY = np.dtype([("a", "<u8"), ("b", "<u8")])  # a path's 128-bit key; sorts by a, then b
_HASH_KEYS = ("ray-fer-paths-a1", "ray-fer-paths-b2")  # SipHash keys (16 characters each)
_MASK = (1 << 64) - 1


def keys_of(values: pa.Array | pa.ChunkedArray | np.ndarray) -> np.ndarray:
    """The 128-bit keys (KEY) of strings; the same string always gets the same key."""
    from pandas.util import hash_array

    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        values = values.to_numpy(zero_copy_only=False)
    values = np.asarray(values, dtype=object)
    keys = np.empty(len(values), dtype=KEY)
    if len(values):
        keys["a"] = hash_array(values, hash_key=_HASH_KEYS[0], categorize=False)
        keys["b"] = hash_array(values, hash_key=_HASH_KEYS[1], categorize=False)
    return keys


def face_keys(paths: pa.Array | pa.ChunkedArray, faces: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Keys of (path, face) pairs: one row of a photo's face rows; a null face (no face, an
    error) is its own value."""
    import pyarrow.compute as pc

    labels = pc.cast(pc.fill_null(faces, -1), pa.string())
    return keys_of(pc.binary_join_element_wise(paths, labels, "\x00"))


@dataclass(frozen=True)
class Digest:
    """An order-free digest of a multiset of paths: how many, and their keys' sums mod 2**64."""

    count: int = 0
    a: int = 0
    b: int = 0

    @classmethod
    def of(cls, keys: np.ndarray) -> Digest:
        return cls(len(keys), int(keys["a"].sum(dtype=np.uint64)), int(keys["b"].sum(dtype=np.uint64)))

    @classmethod
    def of_paths(cls, paths: pa.Array | pa.ChunkedArray | list[str]) -> Digest:
        return cls.of(keys_of(np.asarray(paths, dtype=object) if isinstance(paths, list) else paths))

    def __add__(self, other: Digest) -> Digest:
        return Digest(self.count + other.count, (self.a + other.a) & _MASK, (self.b + other.b) & _MASK)


def total(digests: Any) -> Digest:
    out = Digest()
    for d in digests:
        out = out + d
    return out


# --------------------------------------------------------------------------------------------
# What the pipeline's tasks report


class _TallyState:
    """The actor behind `Tally`: per name, the set of block digests reported."""

    def __init__(self) -> None:
        self.blocks: dict[str, set[Digest]] = {}
        self.sizes: dict[str, int] = {}
        self.written = 0

    def record(self, name: str, digest: Digest) -> None:
        blocks = self.blocks.setdefault(name, set())
        if digest not in blocks:
            blocks.add(digest)
            self.sizes[name] = self.sizes.get(name, 0) + digest.count

    def total(self, name: str) -> Digest:
        return total(self.blocks.get(name, ()))

    def counts(self) -> dict[str, int]:
        return dict(self.sizes)

    def add(self, n: int) -> None:  # rows written: the progress display's count (console.RayCounter)
        self.written += n

    def get(self) -> int:
        return self.written


class Tally:
    """Digests of the blocks that went through named points of a pipeline ("listed", "todo").

    A zero-CPU actor, which also counts the files written for the progress display. Tasks call
    `tally_block`, which waits for the actor to record the block,
    so a finished pipeline's totals are complete. A retried task's block has the same digest and
    is recorded once; two different blocks share a digest only if they hold the same paths,
    which the inputs never do (they are unique)."""

    def __init__(self) -> None:
        import ray

        self.actor = ray.remote(num_cpus=0)(_TallyState).remote()

    def total(self, name: str) -> Digest:
        import ray

        return ray.get(self.actor.total.remote(name))

    def counts(self) -> dict[str, int]:
        import ray

        return ray.get(self.actor.counts.remote())


def tally_block(table: pa.Table, *, tally: Any, name: str) -> pa.Table:
    """Ray Data batch function (pyarrow, one block): report the block's digest of `path` to the
    Tally actor `tally` under `name`; the block passes unchanged."""
    import ray

    if table.num_rows:
        ray.get(tally.record.remote(name, Digest.of(keys_of(table["path"]))))
    return table


# --------------------------------------------------------------------------------------------
# Repeats and membership


def find_repeats(*parts: tuple[np.ndarray, ...]) -> tuple[np.ndarray, np.ndarray, int]:
    """Repeated keys among (keys, positions) parts: returns the repeated keys (sorted, each
    once), the smallest position of each (its first occurrence: the one to keep), and how many
    rows are repeats (occurrences beyond the first)."""
    keys = np.concatenate([p[0] for p in parts]) if parts else np.empty(0, KEY)
    positions = np.concatenate([p[1] for p in parts]) if parts else np.empty(0, np.int64)
    order = np.lexsort((positions, keys["b"], keys["a"]))
    keys, positions = keys[order], positions[order]
    same = keys[1:] == keys[:-1]
    if not same.any():
        return np.empty(0, KEY), np.empty(0, np.int64), 0
    first = np.flatnonzero(np.concatenate([[False], same]) < np.concatenate([same, [False]]))
    return keys[first], positions[first], int(same.sum())


def unique_sorted(*parts: np.ndarray) -> np.ndarray:
    """The distinct keys of several key arrays, sorted (for `contains`)."""
    keys = np.concatenate(parts) if parts else np.empty(0, KEY)
    return np.unique(keys)


def contains(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Which of `keys` are in `sorted_keys` (sorted and distinct, as `unique_sorted` returns)."""
    if not len(sorted_keys) or not len(keys):
        return np.zeros(len(keys), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[at] == keys


def drop_repeats(keys: np.ndarray, positions: np.ndarray, repeated: np.ndarray, keepers: np.ndarray) -> np.ndarray:
    """True for rows that repeat a key whose first occurrence (`keepers`, from `find_repeats`)
    is elsewhere: the rows to drop."""
    if not len(repeated):
        return np.zeros(len(keys), dtype=bool)
    at = np.minimum(np.searchsorted(repeated, keys), len(repeated) - 1)
    return (repeated[at] == keys) & (keepers[at] != positions)
