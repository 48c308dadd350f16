"""`ray-fer export`: bundles copied with float16 weights only when the labels survive it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import _run_cli
from ray_fer.config import UserError
from ray_fer.export import export_model
from ray_fer.model import load_bundle


def test_half_export_is_checked_on_every_val_image_and_halves_the_file(fer_root, bundle_path, tmp_path):
    out = tmp_path / "exported" / "model.pt"
    summary = export_model(bundle_path, str(out), half=True, check_data=str(fer_root / "val"))
    assert summary["images"] == 3589 and summary["agreement"] >= 0.999
    assert summary["changed"] == round((1 - summary["agreement"]) * 3589)
    assert abs(summary["accuracy"] - summary["exported_accuracy"]) <= 0.001
    bundle, ident = load_bundle(str(out))
    assert ident == summary["output_model_id"] != summary["model_id"]  # rounded weights are another model
    assert all(v.dtype == torch.float16 for v in bundle.state_dict.values() if v.is_floating_point())
    assert summary["bytes"] == out.stat().st_size < 0.55 * Path(bundle_path).stat().st_size


def test_an_export_that_changes_labels_writes_nothing(fer_root, bundle_path, tmp_path):
    out = tmp_path / "model.pt"
    with pytest.raises(UserError, match=r"change \d+ of 3589 labels .* export without --half"):
        export_model(bundle_path, str(out), half=True, check_data=str(fer_root / "val"), min_agreement=1.01)
    assert not out.exists()


def test_half_needs_data_to_check_on(bundle_path, tmp_path, capsys):
    rc, _, err = _run_cli(["export", "--model", bundle_path, "--output", str(tmp_path / "m.pt"), "--half"], capsys)
    assert rc == 2 and "--half needs --check-data" in err and not (tmp_path / "m.pt").exists()
    rc, out, _ = _run_cli(["export", "--model", bundle_path, "--output", str(tmp_path / "m.pt")], capsys)
    assert rc == 0 and load_bundle(str(tmp_path / "m.pt"))[1] == load_bundle(bundle_path)[1]
