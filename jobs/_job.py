"""What the job entrypoints share: run one `ray-fer` command as a Ray job, with this script's arguments.

Inside a Ray job the supervisor sets RAY_ADDRESS, so the library's `ray.init()` joins the cluster
instead of starting a local instance. As with the CLI, the JSON summary is the last line of the
output, a config error exits 2 and any other failure 1: `ray job status` says FAILED and
`ray job logs` shows why.
"""

import os
import sys
from typing import NoReturn

from ray_fer.cli import main


def run_command(command: str) -> NoReturn:
    # A job's log is a file, not a terminal: Ray Data's progress bars only fill it with cursor
    # codes, and the last of them are printed at exit, after the summary.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    sys.exit(main([command, *sys.argv[1:]]))
