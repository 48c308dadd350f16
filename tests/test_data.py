"""Image-folder listing (layout checks with clear errors, labels from folder names, limits) and the
read-and-decode stage (order, one row per file, errors in place, local and S3)."""

from __future__ import annotations

import numpy as np
import pytest

from ray_fer.store import storage
from ray_fer.label.datasets import DataError, decode_batch, decoded_dataset, find_split, image_folder_dataset, list_image_folder
from ray_fer.labels import CLASSES


def _folder(root, classes, per_class=2):
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{i}.jpg").write_bytes(b"x")
            (root / name / f"{i}.txt").write_text("not an image extension")
    return root


def test_labels_come_from_folder_names_case_insensitively(tmp_path):
    root = _folder(tmp_path / "train", ["Angry", "HAPPY", "surprise"])
    table = list_image_folder(str(root))
    rows = table.to_pylist()
    assert len(rows) == 6  # .txt files are not listed
    by_label = {CLASSES[r["label"]] for r in rows}
    assert by_label == {"angry", "happy", "surprise"}
    assert all(r["path"].endswith(".jpg") for r in rows)


def test_limit_per_class_is_a_seeded_sample(tmp_path):
    root = _folder(tmp_path / "train", ["fear", "sad"], per_class=10)
    a = list_image_folder(str(root), limit_per_class=3, seed=1).to_pylist()
    b = list_image_folder(str(root), limit_per_class=3, seed=1).to_pylist()
    assert a == b and len(a) == 6


def test_layout_errors_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(DataError, match="does not exist; check data.train"):
        list_image_folder(str(tmp_path / "missing"))
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match="has no class folders"):
        list_image_folder(str(tmp_path / "flat"))
    root = _folder(tmp_path / "odd", ["happy", "contempt", "cats"])
    with pytest.raises(DataError, match="not expression classes: cats, contempt; class folders must be named angry"):
        list_image_folder(str(root))
    (tmp_path / "empty" / "happy").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        list_image_folder(str(tmp_path / "empty"))


def test_find_split_accepts_validation_for_val(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "Validation").mkdir()
    assert find_split(str(tmp_path), "val").endswith("Validation")
    assert find_split(str(tmp_path), "train").endswith("train")
    with pytest.raises(DataError, match="has no test/ folder"):
        find_split(str(tmp_path), "test")
    with pytest.raises(DataError, match="pass DATA=PATH"):
        find_split(str(tmp_path / "nope"), "train")


def test_fer2013_lists_all_seven_classes(fer_root):
    table = list_image_folder(str(fer_root / "val"))
    assert table.num_rows == 3589
    counts = table.group_by("label").aggregate([("label", "count")]).to_pydict()
    assert dict(zip(counts["label"], counts["label_count"]))[CLASSES.index("disgust")] == 56


# --------------------------------------------------------------------------------------------
# Reading and decoding


def _fer_files(fer_root, n):
    return sorted((fer_root / "val" / "happy").glob("*.jpg"))[:n]


def test_read_each_keeps_order_and_puts_errors_in_place(fer_root, tmp_path):
    files = [str(p) for p in _fer_files(fer_root, 5)]
    paths = files[:2] + [str(tmp_path / "missing.jpg")] + files[2:]
    out = list(storage.read_each(paths))
    assert len(out) == 6 and isinstance(out[2], FileNotFoundError)
    assert [o for i, o in enumerate(out) if i != 2] == [open(f, "rb").read() for f in files]


def test_read_each_from_s3_reads_ahead_in_order(fer_root, s3_bucket):
    """More files than the read-ahead window (2 x threads), one missing: order and errors kept."""
    files = _fer_files(fer_root, 40)
    for i, f in enumerate(files):
        storage.write_bytes(f"s3://{s3_bucket}/in/{i:03d}.jpg", f.read_bytes())
    uris = [f"s3://{s3_bucket}/in/{i:03d}.jpg" for i in range(40)]
    uris.insert(17, f"s3://{s3_bucket}/in/nope.jpg")
    out = list(storage.read_each(uris, threads=4))
    assert isinstance(out[17], FileNotFoundError)
    assert [o for i, o in enumerate(out) if i != 17] == [f.read_bytes() for f in files]


def test_decode_batch_one_row_per_file_with_errors(fer_root, tmp_path):
    files = [str(p) for p in _fer_files(fer_root, 3)]
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    paths = np.array(files + [str(tmp_path / "bad.jpg"), str(tmp_path / "gone.jpg")], dtype=object)
    kept = decode_batch({"path": paths}, decode_size=48)
    assert kept["image"].shape == (5, 48, 48) and list(kept["width"][:3]) == [48, 48, 48]
    assert [e is None for e in kept["error"]] == [True, True, True, False, False]
    assert "not an image" in kept["error"][3] and kept["error"][4] == "cannot read file: not found"


def _block_sizes(ds) -> list[int]:
    return sorted(len(b["image"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy"))


def test_decoded_dataset_splits_evenly_and_keeps_every_row(ray_local, fer_root):
    table = list_image_folder(str(fer_root / "val"))
    assert _block_sizes(decoded_dataset(table, decode_size=48, decode_batch_size=1000)) == [
        897, 897, 897, 898]  # not 3 x 1000 + 589
    # a batch size above the input still gives every CPU (2 here) a task
    assert _block_sizes(decoded_dataset(table, decode_size=48, decode_batch_size=10_000)) == [
        1794, 1795]
    empty = decoded_dataset(table.slice(0, 0), decode_size=48)
    assert empty.count() == 0


def test_shuffled_training_blocks_mix_the_classes(ray_local, fer_root):
    table = list_image_folder(str(fer_root / "val"), limit_per_class=100)  # listed class by class
    ds = image_folder_dataset(table, decode_size=48, shuffle_seed=0)
    first = next(iter(ds.iter_batches(batch_size=None, batch_format="numpy")))
    assert len(set(first["label"].tolist())) == 7
    again = image_folder_dataset(table, decode_size=48, shuffle_seed=0).take_all()
    assert [r["label"] for r in again] == [int(v) for b in ds.iter_batches(batch_size=None) for v in b["label"]]


@pytest.mark.s3
def test_reads_outlast_a_store_that_fails_for_a_while(fer_root, s3_bucket, s3_faults):
    """503s and connection resets from a real HTTP server: retried, in order, nothing lost."""
    import boto3

    files = _fer_files(fer_root, 12)
    for i, f in enumerate(files):
        boto3.client("s3").put_object(Bucket=s3_bucket, Key=f"in/{i}.jpg", Body=f.read_bytes())
    uris = [f"s3://{s3_bucket}/in/{i}.jpg" for i in range(len(files))]
    s3_faults.fail(s3_bucket, [f"in/{i}.jpg" for i in (1, 5)], times=5, how="503")
    s3_faults.fail(s3_bucket, [f"in/{i}.jpg" for i in (2, 9)], times=4, how="reset")
    out = list(storage.read_each(uris, threads=4, delays=(0.05, 0.1, 0.2, 0.4)))
    assert out == [f.read_bytes() for f in files]
    assert all(s3_faults.failed[f"/{s3_bucket}/in/{i}.jpg"] >= 4 for i in (1, 5, 2, 9))  # they did fail


@pytest.mark.s3
def test_a_store_that_keeps_failing_stops_the_reader_naming_the_file(fer_root, s3_bucket, s3_faults):
    import boto3

    boto3.client("s3").put_object(Bucket=s3_bucket, Key="in/a.jpg", Body=_fer_files(fer_root, 1)[0].read_bytes())
    s3_faults.fail(s3_bucket, ["in/a.jpg"], times=-1, how="503")
    with pytest.raises(storage.ReadError, match=f"cannot read s3://{s3_bucket}/in/a.jpg after 2 attempts: .*AWS_ENDPOINT_URL"):
        list(storage.read_each([f"s3://{s3_bucket}/in/a.jpg"], delays=(0.01,)))
    s3_faults.heal()  # a missing object is the file's own state: reported, not retried
    missing = list(storage.read_each([f"s3://{s3_bucket}/in/gone.jpg"], delays=(60.0,)))
    assert isinstance(missing[0], FileNotFoundError)


def test_retry_delays_come_from_the_environment(monkeypatch):
    monkeypatch.setenv(storage.RETRY_ENV, "0.1, 2")
    assert storage.read_retry_delays() == (0.1, 2.0)
    monkeypatch.setenv(storage.RETRY_ENV, "soon")
    with pytest.raises(storage.StorageError, match="not a list of seconds"):
        storage.read_retry_delays()


def test_undecodable_training_files_are_one_warning(ray_local, fer_root, tmp_path, caplog):
    import shutil

    for f in _fer_files(fer_root, 6):
        (tmp_path / "happy").mkdir(exist_ok=True)
        shutil.copy(f, tmp_path / "happy" / f.name)
    for i in range(9):
        (tmp_path / "happy" / f"bad{i}.jpg").write_bytes(b"not a jpeg")
    table = list_image_folder(str(tmp_path))
    caplog.clear()  # (listing warned that six classes have no images)
    with caplog.at_level("WARNING", logger="ray_fer.label.datasets"):
        ds = image_folder_dataset(table, decode_size=48)
    assert ds.count() == 6 and ds.columns() == ["image", "label"]
    warnings = [r.getMessage() for r in caplog.records if r.name == "ray_fer.label.datasets"]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("left out 9 of 15 files that could not be decoded, e.g. ")
    assert warnings[0].count("bad") == 5 and "not an image" in warnings[0]  # five examples, with reasons
