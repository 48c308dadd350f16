#!/usr/bin/env bash
# `make demo`: faces found and labelled in a few photos that need no download (always); then, with
# a data set (FER2013 by default), label and evaluate its validation folder with the packaged model
# on this machine's local Ray instance and fine-tune that model for a few minutes. About 1 minute
# without data, 6-8 with it, on 2 CPU cores.
set -euo pipefail
DATA=${DATA:-../shared/data/fer2013}
RUNS=${RUNS:-./runs}
OUT=${OUT:-./out}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}  # a private local instance on loopback
MODEL=fer-photos  # the default model packaged with ray-fer (ray_fer/models/fer-photos.pt): no training needed

echo "== 1 faces in photos: five pictures made from the portrait matplotlib ships -> $OUT/photos"
python jobs/demo_photos.py "$OUT/photos"
ray-fer predict --model "$MODEL" --faces detect "$OUT"/photos/*.jpg --annotate "$OUT/annotated" > "$OUT/predict.json"
python - "$OUT/predict.json" <<'PY'
import json, sys
summary = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
for p in summary["predictions"]:
    name = p["path"].rsplit("/", 1)[-1]
    print(f"  {name:14} " + ("no face found" if p["face"] is None else
                             f"face {p['face']}: {p['label']} ({p['confidence']:.0%}), box {p['box']}"))
print("annotated pictures: " + "  ".join(summary["annotated"]))
PY

VAL=""
if [ -d "$DATA/train" ]; then
  for name in val validation Val Validation; do
    if [ -d "$DATA/$name" ]; then VAL="$DATA/$name"; break; fi
  done
fi
if [ -z "$VAL" ]; then
  echo "== demo done. Steps 2-4 (labelling a data set with Ray, evaluating, training) need FER2013 or any"
  echo "   image folder with train/<class>/ and val/<class>/ (the Kaggle 'face expression recognition' download"
  echo "   works as it is): make demo DATA=/path/to/it   (nothing found at '$DATA')"
  exit 0
fi

echo "== 2 labelling $VAL with the packaged model ($MODEL) on a local Ray instance -> $OUT/labels"
ray-fer infer --model "$MODEL" --input "$VAL" --output "$OUT/labels" --overwrite
python - "$OUT/labels" <<'PY'
import sys
import pyarrow.dataset as ds
table = ds.dataset(sys.argv[1], format="parquet").to_table()
cols = ["path", "label", "confidence", "prob_happy", "error"]
print(table.select(cols).slice(0, 5).to_pandas().to_string(index=False, max_colwidth=60))
print(f"... {table.num_rows} rows in {sys.argv[1]}")
PY

echo "== 3 evaluating $MODEL on $VAL -> $OUT/eval"
ray-fer evaluate --model "$MODEL" --data "$VAL" --output "$OUT/eval"
echo "pictures: $OUT/eval/confusion_matrix.png   report: $OUT/eval/report.md"

echo "== 4 fine-tuning the packaged model for a few minutes (200 faces per class, 2 epochs) -> $RUNS/demo"
echo "   (the packaged models took hours: jobs/fer2013-cpu.yaml, jobs/fer-photos-cpu.yaml; re-running resumes the finished run,"
echo "    delete $RUNS/demo for a fresh one)"
ray-fer train --config jobs/demo.yaml \
  --set data.train="$DATA/train" --set data.val="$VAL" --set run.storage_path="$RUNS"
echo "curves: $RUNS/demo/curves.png   label with it: ray-fer infer --model $RUNS/demo/model.pt ..."
