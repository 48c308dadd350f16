"""What the job entrypoints share: run one `ray-fer` command as a Ray job, with this script's arguments.

Inside a Ray job the supervisor sets RAY_ADDRESS, so the library's `ray.init()` joins the cluster
instead of starting a local instance. As with the CLI, the job log holds the same lines as a
terminal would (`-v` adds Ray's own), the JSON summary is the last line, a config error exits 2
and any other failure 1: `ray job status` says FAILED and `ray job logs` shows why.
"""

import sys
from typing import NoReturn

from ray_fer.cli import main


def run_command(command: str) -> NoReturn:
    sys.exit(main([command, *sys.argv[1:]]))
