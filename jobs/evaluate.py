"""Evaluation as a Ray job (`ray-fer evaluate`): a model bundle on a labelled image folder. From the
repository root:

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/evaluate.py --model s3://my-fer-bucket/runs/fer-b0-224/model.pt \
            --data s3://my-fer-bucket/fer2013/test
"""

from _job import run_command

if __name__ == "__main__":
    run_command("evaluate")
