"""The `ray-fer` command: parse arguments, configure logging, call one library function, print
its JSON summary as the last line of stdout. User errors print one line and exit with status 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Callable

from ray_fer.config import UserError


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune EfficientNet-B0 with Ray Train")
    p.add_argument("--config", help="YAML config (e.g. jobs/train.yaml); defaults apply where omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set train.epochs=5 (repeatable)")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> dict[str, Any]:
    from ray_fer.config import TrainJobConfig, load_config
    from ray_fer.train import run_training

    return run_training(load_config(TrainJobConfig, args.config, args.overrides))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ray-fer", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train,):
        add(sub)
    return parser


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr,
    )


def run(func: Callable[[], dict[str, Any]], prog: str = "ray-fer") -> int:
    """Call `func`, print its summary as one JSON line; user errors become one line and exit 2."""
    try:
        summary = func()
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    finally:
        _flush_ray_logs()
    print(json.dumps(summary), flush=True)
    return 0


def _flush_ray_logs() -> None:
    # Ray forwards worker logs to the driver's stdout asynchronously; disconnecting first keeps
    # the JSON summary the last line.
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return run(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
