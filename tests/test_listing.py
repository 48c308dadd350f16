"""label/listing.py and store/pathsets.py: listing by Ray tasks (a local tree, S3 prefixes and key ranges)
gives every file exactly once; the digests and repeats that replace sets of paths on the driver."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from ray_fer.label import listing

from ray_fer.store import pathsets
from ray_fer.label.decode import IMAGE_EXTENSIONS
from ray_fer.label.listing import Shard, listing_dataset, plan_shards


def _listed(shards: list[Shard], with_size: bool = False) -> pa.Table:
    """Run the listing tasks and gather their rows here."""
    import ray

    tables = [t for t in ray.get(listing_dataset(shards, extensions=IMAGE_EXTENSIONS,
                                                 with_size=with_size).to_arrow_refs()) if t.num_rows]
    return pa.concat_tables(tables)


def _tree(root: Path) -> list[str]:
    """Images at several depths, a folder too big to expand, other files and a symlink loop;
    returns the images' paths."""
    images = []

    def touch(rel: str, data: bytes = b"x") -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if rel.lower().endswith(IMAGE_EXTENSIONS):
            images.append(str(path))

    touch("top.jpg", b"12345")
    touch("notes.txt")
    for i in range(12):
        touch(f"a/{i:02d}.jpg")
    touch("a/deep/x/y/face.PNG")
    touch("a/deep/x/readme.md")
    (root / "b").mkdir()
    for i in range(30):
        touch(f"c/flat/{i:03d}.webp")
    os.symlink(root, root / "a" / "loop")  # not followed: no file twice, no endless walk
    return images


def test_local_tree_is_listed_by_tasks_each_file_once(ray_local, tmp_path, monkeypatch):
    root = tmp_path / "store"
    images = _tree(root)
    monkeypatch.setattr(listing, "LOCAL_LEVEL_ENTRIES", 20)  # c/flat (30 entries) is listed by one task
    for wanted in (1, 3, 1000):
        shards = plan_shards(str(root), wanted=wanted, extensions=IMAGE_EXTENSIONS)
        table = _listed(shards, with_size=True)
        paths = table["path"].to_pylist()
        assert len(paths) == len(set(paths)) and sorted(paths) == sorted(images), wanted
    assert Shard(str(root), recursive=False) in shards  # the root's own files, without its folders
    assert Shard(str(root / "c" / "flat")) in shards  # too big to expand: one task lists it whole
    sizes = dict(zip(paths, table["size"].to_pylist()))
    assert sizes[str(root / "top.jpg")] == 5
    assert plan_shards(str(root / "b"), wanted=10, extensions=IMAGE_EXTENSIONS) == []  # nothing there


@pytest.mark.s3
def test_s3_prefixes_and_key_ranges_are_listed_by_tasks_each_key_once(ray_local, s3_bucket, monkeypatch):
    import boto3

    s3 = boto3.client("s3")
    names = [hashlib.sha1(str(i).encode()).hexdigest()[:12] for i in range(90)]  # a flat level of hashed names
    keys = [f"in/flat/{n}.jpg" for n in names] + [f"in/nested/p{i}/q/{j}.jpg" for i in range(3) for j in range(4)]
    keys += [f"in/flat/f{i:02d}.jpg" for i in range(15)]  # one range of more than a page: cut again
    keys += ["in/top.jpg", "in/flat/-first.jpg", "in/flat/~last.png", "in/flat/\u00e9t\u00e9.jpg"]
    for key in keys + ["in/readme.md", "in/flat/marker/", "inbox/not-under-in.jpg"]:
        s3.put_object(Bucket=s3_bucket, Key=key, Body=b"x")
    # small pages: the flat level (109 keys, 11 pages of 10) is too big to enumerate and is cut into ranges
    monkeypatch.setattr(listing, "PAGE_KEYS", 10)
    monkeypatch.setattr(listing, "PLAN_PAGES", 3)
    shards = plan_shards(f"s3://{s3_bucket}/in/", wanted=100, extensions=IMAGE_EXTENSIONS)
    ranges = [s for s in shards if s.after is not None or s.until is not None]
    assert len(ranges) > 3 and all(s.uri == f"s3://{s3_bucket}/in/flat" for s in ranges)
    assert any(s.after and s.after.startswith("in/flat/f") for s in ranges)  # cut at the second character
    paths = _listed(shards)["path"].to_pylist()
    assert len(paths) == len(set(paths))
    assert sorted(paths) == sorted(f"s3://{s3_bucket}/{k}" for k in keys)


# --------------------------------------------------------------------------------------------
# Digests, repeats, membership


def test_digests_are_order_free_and_tell_sets_apart():
    paths = [f"/store/{i}.jpg" for i in range(1000)]
    whole = pathsets.Digest.of_paths(paths)
    parts = pathsets.total(pathsets.Digest.of_paths(paths[i::7]) for i in range(7))
    assert parts == whole and whole.count == 1000
    assert pathsets.Digest.of_paths(paths[:-1] + [paths[0]]) != whole  # a repeat in place of a file
    assert pathsets.Digest.of_paths(paths[:-1] + ["/store/x.jpg"]) != whole  # another file


def test_repeats_keep_the_first_occurrence_and_membership_is_exact():
    a = pathsets.keys_of(pa.array(["/a", "/b", "/c", "/b"]))
    b = pathsets.keys_of(pa.array(["/c", "/d"]))
    pos_a = np.arange(4, dtype=np.int64)
    pos_b = (1 << 32) + np.arange(2, dtype=np.int64)
    repeated, keepers, extra = pathsets.find_repeats((a, pos_a), (b, pos_b))
    assert extra == 2  # /b and /c once more each
    assert pathsets.drop_repeats(a, pos_a, repeated, keepers).tolist() == [False, False, False, True]
    assert pathsets.drop_repeats(b, pos_b, repeated, keepers).tolist() == [True, False]
    done = pathsets.unique_sorted(a, b)
    asked = pathsets.keys_of(pa.array(["/d", "/e", "/a"]))
    assert pathsets.contains(done, asked).tolist() == [True, False, True]
    assert not pathsets.contains(done[:0], asked).any()
