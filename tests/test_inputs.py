"""label/inputs.py: what to label, checked before any cluster work: folders listed by tasks,
manifest files and manifest folders (Parquet and CSV, local and on S3), `ray-fer list`."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_fer.store import storage
from ray_fer.cli import build_parser
from ray_fer.label.inputs import MANIFEST_MARKER, InputError, find_inputs, list_inputs, write_manifest
from ray_fer.store.storage import StorageError



def test_list_inputs_recurses_and_filters_extensions(ray_local, tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ["a/1.jpg", "a/b/2.PNG", "3.webp", "a/b/4.tiff", "notes.txt", "a/5.parquet"]:
        (tmp_path / name).write_bytes(b"x")
    paths = list_inputs(str(tmp_path))["path"].to_pylist()
    assert [Path(p).relative_to(tmp_path).as_posix() for p in paths] == ["3.webp", "a/1.jpg", "a/b/2.PNG", "a/b/4.tiff"]


def test_list_inputs_errors_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(InputError, match=f"input '{tmp_path}/nope' does not exist; pass a folder"):
        find_inputs(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(InputError, match="no images under .*empty"):
        find_inputs(str(tmp_path / "empty"))
    (tmp_path / "face.jpg").write_bytes(b"x")
    with pytest.raises(InputError, match="is a file; pass a folder"):
        find_inputs(str(tmp_path / "face.jpg"))
    with pytest.raises(StorageError, match="cannot read input 'gs://bucket/faces': unsupported storage scheme"):
        find_inputs("gs://bucket/faces")


def test_manifests_parquet_and_csv(ray_local, tmp_path):
    pq.write_table(pa.table({"path": ["faces/a.jpg", str(tmp_path / "b.jpg"), "faces/a.jpg"], "id": [1, 2, 3]}),
                   tmp_path / "list.parquet")
    paths = list_inputs(str(tmp_path / "list.parquet"))["path"].to_pylist()
    assert paths == [str(tmp_path / "faces" / "a.jpg"), str(tmp_path / "b.jpg")]  # relative to it, once each
    (tmp_path / "list.csv").write_text("path,label\ns3://bucket/x.jpg,happy\nfaces/c.png,sad\n")
    assert list_inputs(str(tmp_path / "list.csv"))["path"].to_pylist() == [
        "s3://bucket/x.jpg", str(tmp_path / "faces" / "c.png")]
    (tmp_path / "bad.csv").write_text("file,label\nx.jpg,happy\n")
    with pytest.raises(InputError, match="has no 'path' column \\(it has: file, label\\)"):
        find_inputs(str(tmp_path / "bad.csv"))


def _manifest_folder(root: str) -> list[str]:
    """A folder of Parquet and CSV manifest files, with relative paths and a path in two files;
    returns the paths it lists, resolved, each once."""
    files = [storage.join(root, "faces", f"{i}.jpg") for i in range(6)]
    part0 = storage.join(root, "part-0.parquet")
    fs, path = storage.filesystem(part0)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(pa.table({"path": ["faces/0.jpg", files[1], "faces/2.jpg"]}), path, filesystem=fs)
    storage.write_bytes(storage.join(root, "part-1.csv"),
                        ("path,label\n" + "".join(f"{p},x\n" for p in files[2:])).encode())
    return files


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_manifest_folders_are_read_by_tasks_each_path_once(ray_local, tmp_path, where, request):
    root = str(tmp_path / "manifest") if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/lists/a"
    files = _manifest_folder(root)
    inputs = find_inputs(root)
    assert inputs.kind == "manifest" and len(inputs.manifests) == 2 and not inputs.unique
    assert sorted(list_inputs(root)["path"].to_pylist()) == sorted(files)  # faces/2.jpg is in both files
    storage.write_bytes(storage.join(root, "part-2.csv"), b"file\nx.jpg\n")  # found by a task: still one line
    with pytest.raises(InputError, match="part-2.csv' has no 'path' column") as e:
        list_inputs(root)
    assert len(str(e.value).splitlines()) == 1
    storage.write_bytes(storage.join(root, "extra.jpg"), b"x")  # an image beside them: a folder of images
    assert find_inputs(root).kind == "folder"


def test_ray_fer_list_writes_a_manifest_folder_that_labelling_reads(ray_local, tmp_path):
    store = tmp_path / "store"
    for rel in ["a/1.jpg", "a/b/2.png", "c/3.jpg", "c/notes.txt"]:
        (store / rel).parent.mkdir(parents=True, exist_ok=True)
        (store / rel).write_bytes(b"x" * len(rel))
    out = str(tmp_path / "manifest")
    summary = write_manifest(str(store), out)
    assert summary["images"] == 3 and (Path(out) / MANIFEST_MARKER).is_file()
    table = pq.read_table(out)
    assert sorted(zip(table["path"].to_pylist(), table["size"].to_pylist())) == [
        (str(store / "a/1.jpg"), 7), (str(store / "a/b/2.png"), 9), (str(store / "c/3.jpg"), 7)]
    inputs = find_inputs(out)
    assert inputs.kind == "manifest" and inputs.unique  # written by ray-fer list: no pass for repeats
    assert sorted(list_inputs(out)["path"].to_pylist()) == list_inputs(str(store))["path"].to_pylist()
    assert json.loads((Path(out) / MANIFEST_MARKER).read_text())["source"] == str(store)
    with pytest.raises(InputError, match="is not empty .* pass --overwrite"):
        write_manifest(str(store), out)
    (store / "c" / "4.jpg").write_bytes(b"x")
    assert write_manifest(str(store), out, overwrite=True)["images"] == 4
    with pytest.raises(InputError, match="does not exist"):
        write_manifest(str(tmp_path / "nope"), out)
    # the command (its run here would stop this session's Ray: main() shuts Ray down at the end)
    args = build_parser().parse_args(["list", "--input", str(store), "--output", out, "--overwrite"])
    assert (args.input, args.output, args.overwrite) == (str(store), out, True) and args.func.__name__ == "_list"
