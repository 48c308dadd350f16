"""Training as a Ray job (`ray-fer train`), from the repository root:

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train.py --config jobs/train.yaml [--set key=value ...]
"""

from _job import run_command

if __name__ == "__main__":
    run_command("train")
