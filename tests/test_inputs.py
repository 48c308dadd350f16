"""inputs.py: listing the images of a folder or a manifest, checked before any cluster work."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_fer.inputs import InputError, list_inputs
from ray_fer.storage import StorageError


def test_list_inputs_recurses_and_filters_extensions(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ["a/1.jpg", "a/b/2.PNG", "3.webp", "a/b/4.tiff", "notes.txt", "a/5.parquet"]:
        (tmp_path / name).write_bytes(b"x")
    paths = list_inputs(str(tmp_path))["path"].to_pylist()
    assert [Path(p).relative_to(tmp_path).as_posix() for p in paths] == ["3.webp", "a/1.jpg", "a/b/2.PNG", "a/b/4.tiff"]


def test_list_inputs_errors_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(InputError, match=f"input '{tmp_path}/nope' does not exist; pass a folder"):
        list_inputs(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(InputError, match="no images under .*empty"):
        list_inputs(str(tmp_path / "empty"))
    (tmp_path / "face.jpg").write_bytes(b"x")
    with pytest.raises(InputError, match="is a file; pass a folder"):
        list_inputs(str(tmp_path / "face.jpg"))
    with pytest.raises(StorageError, match="cannot read input 'gs://bucket/faces': unsupported storage scheme"):
        list_inputs("gs://bucket/faces")


def test_manifests_parquet_and_csv(tmp_path):
    pq.write_table(pa.table({"path": ["faces/a.jpg", str(tmp_path / "b.jpg"), "faces/a.jpg"], "id": [1, 2, 3]}),
                   tmp_path / "list.parquet")
    paths = list_inputs(str(tmp_path / "list.parquet"))["path"].to_pylist()
    assert paths == [str(tmp_path / "faces" / "a.jpg"), str(tmp_path / "b.jpg")]  # relative to it, once each
    (tmp_path / "list.csv").write_text("path,label\ns3://bucket/x.jpg,happy\nfaces/c.png,sad\n")
    assert list_inputs(str(tmp_path / "list.csv"))["path"].to_pylist() == [
        "s3://bucket/x.jpg", str(tmp_path / "faces" / "c.png")]
    (tmp_path / "bad.csv").write_text("file,label\nx.jpg,happy\n")
    with pytest.raises(InputError, match="has no 'path' column \\(it has: file, label\\)"):
        list_inputs(str(tmp_path / "bad.csv"))
