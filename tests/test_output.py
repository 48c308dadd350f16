"""output.py: the output folder checks (overwrite, skip-existing, foreign files), made before any
cluster work."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_fer.output import OutputError, prepare_output


def test_output_checks(tmp_path):
    assert len(prepare_output(str(tmp_path / "new"), overwrite=False, skip_existing=False, model_id="m")) == 0
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.table({"path": ["/a.jpg"], "model": ["m"]}), out / "part.parquet")
    with pytest.raises(OutputError, match="is not empty \\(1 files\\); pass --overwrite .* --skip-existing"):
        prepare_output(str(out), overwrite=False, skip_existing=False, model_id="m")
    with pytest.raises(OutputError, match="labelled by model m, not other; pass the same --model"):
        prepare_output(str(out), overwrite=False, skip_existing=True, model_id="other")
    assert prepare_output(str(out), overwrite=False, skip_existing=True, model_id="m").to_pylist() == ["/a.jpg"]
    (out / "notes.md").write_text("mine")
    with pytest.raises(OutputError, match="holds files ray-fer did not write .*notes.md"):
        prepare_output(str(out), overwrite=True, skip_existing=False, model_id="m")
    assert (out / "part.parquet").exists()  # nothing deleted
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        prepare_output(str(tmp_path / "file"), overwrite=False, skip_existing=False, model_id="m")
