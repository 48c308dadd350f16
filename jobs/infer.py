"""Labelling as a Ray job (`ray-fer infer`): images in, one Parquet row per image out. From the
repository root:

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/infer.py --config jobs/infer.yaml [--set key=value ...]
"""

from _job import run_command

if __name__ == "__main__":
    run_command("infer")
