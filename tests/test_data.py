"""Image-folder listing: layout checks with clear errors, labels from folder names, limits."""

from __future__ import annotations

import pytest

from ray_fer.data import DataError, find_split, list_image_folder
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
