#!/usr/bin/env bash
# `make demo`: label and evaluate DATA's validation folder (FER2013 by default) with the packaged
# model on this machine's local Ray instance, then show a short training run. About 6 minutes on 2 CPU cores.
set -euo pipefail
DATA=${DATA:-../shared/data/fer2013}
RUNS=${RUNS:-./runs}
OUT=${OUT:-./out}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}  # a private local instance on loopback

if [ ! -d "$DATA/train" ]; then
  echo "demo: no data set at '$DATA' (expected $DATA/train/<class>/*.jpg and $DATA/val/ or $DATA/validation/)." >&2
  echo "demo: pass one with: make demo DATA=/path/to/fer2013   (e.g. the Kaggle 'face expression recognition' folder)" >&2
  exit 1
fi
VAL=""
for name in val validation Val Validation; do
  if [ -d "$DATA/$name" ]; then VAL="$DATA/$name"; break; fi
done
if [ -z "$VAL" ]; then
  echo "demo: '$DATA' has train/ but no val/ or validation/ folder; pass DATA=... with both" >&2
  exit 1
fi

MODEL=fer2013  # the model packaged with ray-fer (ray_fer/models/fer2013.pt): no training needed

echo "== 1/3 labelling $VAL with the packaged model ($MODEL) -> $OUT/labels"
ray-fer infer --model "$MODEL" --input "$VAL" --output "$OUT/labels" --overwrite
python - "$OUT/labels" <<'PY'
import sys
import pyarrow.dataset as ds
table = ds.dataset(sys.argv[1], format="parquet").to_table()
cols = ["path", "label", "confidence", "prob_happy", "error"]
print(table.select(cols).slice(0, 5).to_pandas().to_string(index=False, max_colwidth=60))
print(f"... {table.num_rows} rows in {sys.argv[1]}")
PY

echo "== 2/3 evaluating $MODEL on $VAL -> $OUT/eval"
ray-fer evaluate --model "$MODEL" --data "$VAL" --output "$OUT/eval"
echo "pictures: $OUT/eval/confusion_matrix.png   report: $OUT/eval/report.md"

echo "== 3/3 a short training run, to show training (500 images per class, 64 px, 10 epochs) -> $RUNS/demo"
echo "   (the packaged model took hours: jobs/fer2013-cpu.yaml; re-running resumes the finished run,"
echo "    delete $RUNS/demo for a fresh one)"
ray-fer train --config jobs/demo.yaml \
  --set data.train="$DATA/train" --set data.val="$VAL" --set run.storage_path="$RUNS"
echo "curves: $RUNS/demo/curves.png   label with it: ray-fer infer --model $RUNS/demo/model.pt ..."
