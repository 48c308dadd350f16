"""The `ray-fer` command: parse arguments, configure logging, call one library function, print
its JSON summary as the last line of stdout. User errors print one line and exit with status 2."""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from typing import Any, Callable, NoReturn

from ray_fer import console
from ray_fer.config import UserError


FACES_HELP = ("auto (the default): images up to 128 px, such as FER2013's 48x48 crops, are labelled whole and "
              "the others are searched for faces; detect: find, align and label every face (one row per face); "
              "whole: label each whole image (stores of face crops)")

MODEL_HELP = ("fer-photos (the packaged model, the default; fer2013: the one trained on FER2013 alone), a model.pt "
              "written by `ray-fer train` (local or s3://) or its run folder, or an MLflow model URI "
              "(runs:/<run id>/model, models:/<name>/<version>)")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune EfficientNet-B0 with Ray Train")
    p.add_argument("--config", help="YAML config (e.g. jobs/train.yaml); defaults apply where omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set train.epochs=5 (repeatable)")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> dict[str, Any]:
    from ray_fer.config import TrainJobConfig, load_config

    cfg = load_config(TrainJobConfig, args.config, args.overrides)  # before importing torch and Ray: fast errors
    from ray_fer.train.trainer import run_training

    return run_training(cfg)


def _add_infer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("infer", help="label an image folder, s3:// prefix or manifest into a Parquet data set")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--input", help="image folder, s3://bucket/prefix, or a .parquet/.csv manifest with a path column")
    p.add_argument("--output", help="folder or s3://bucket/prefix for the Parquet data set")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing output")
    p.add_argument("--skip-existing", action="store_true", default=None,
                   help="label only the images not yet in the output (finishes a crashed job)")
    p.add_argument("--faces", help=FACES_HELP)
    p.add_argument("--fps", type=float, help="videos (.mp4 .m4v .mov .mkv .webm .avi, labelled where faces are "
                   "searched): frames sampled per second of video, by timestamp (default 2; 0: every frame)")
    p.add_argument("--config", help="YAML config with the same keys; flags and --set override it")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set batch_size=128 or --set precision=fp32 (repeatable)")
    p.set_defaults(func=_infer)


def _infer(args: argparse.Namespace) -> dict[str, Any]:
    from ray_fer.config import InferConfig, load_config, parse_overrides
    from ray_fer.label.infer import label_images

    flags = {"model": args.model, "input": args.input, "output": args.output,
             "overwrite": args.overwrite, "skip_existing": args.skip_existing, "faces": args.faces,
             "fps": args.fps}
    overrides = parse_overrides(args.overrides) | {k: v for k, v in flags.items() if v is not None}
    return label_images(load_config(InferConfig, args.config, overrides))


def _add_list(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list a folder or s3:// prefix once into a manifest folder (Parquet: path, "
                       "size), to label it with ray-fer infer --input MANIFEST_DIR")
    p.add_argument("--input", required=True, help="image folder, s3://bucket/prefix, or a manifest")
    p.add_argument("--output", required=True, help="folder or s3://bucket/prefix for the manifest's Parquet files")
    p.add_argument("--overwrite", action="store_true", help="replace an existing manifest folder")
    p.set_defaults(func=_list)


def _list(args: argparse.Namespace) -> dict[str, Any]:
    from ray_fer.label.inputs import write_manifest

    return write_manifest(args.input, args.output, overwrite=args.overwrite)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="accuracy, per-class metrics and a confusion matrix on a labelled folder")
    p.add_argument("--model", default="fer-photos", help=MODEL_HELP)
    p.add_argument("--data", required=True, help="labelled image folder <class>/*.jpg (local or s3://), "
                   "e.g. ../shared/data/fer2013/val")
    p.add_argument("--output", help="folder for metrics.json, confusion_matrix.png and report.md "
                   "(default: <model folder>/eval/<data folder>-<tta>)")
    p.add_argument("--tta", default="none", help="test-time augmentation: none, flip or tencrop (default: none)")
    p.add_argument("--precision", default="auto", help="auto (as labelling: bf16 where the hardware has it), "
                   "bf16 or fp32 (default: auto)")
    p.add_argument("--limit-per-class", type=int, metavar="N", help="evaluate at most N images per class")
    p.add_argument("--faces", default="auto", help=FACES_HELP + "; where faces are detected, an image's "
                   "prediction is its largest face's")
    p.add_argument("--tracking", default="none", help="mlflow: log the figures and the report to the model's "
                   "training run in MLflow, or a new run (MLFLOW_TRACKING_URI; unset: the store the model's run "
                   "folder names, else ./runs/mlflow.db); default: none")
    p.set_defaults(func=_evaluate)


def _evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from ray_fer.label.evaluate import evaluate_folder

    return evaluate_folder(args.model, args.data, output=args.output, tta=args.tta, precision=args.precision,
                           limit_per_class=args.limit_per_class, faces=args.faces, track=args.tracking)


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="training curves (curves.png) and per-epoch metrics.csv of a run; or, for a "
                       "labelled output with videos, each track's emotions (tracks.csv) and a timeline per video")
    p.add_argument("run", metavar="RUN", help="run folder <run.storage_path>/<run.name>, or an output that "
                   "`ray-fer infer` wrote (local or s3://)")
    p.add_argument("--output", help="where a labelled output's track report goes (default ./tracks/<its name>)")
    p.set_defaults(func=_report)


def _report(args: argparse.Namespace) -> dict[str, Any]:
    from ray_fer.store import storage
    from ray_fer.store.journal import SUCCESS_FILE

    if storage.exists(storage.join(args.run, SUCCESS_FILE)):  # a labelled output, not a training run
        from ray_fer.label.videos import report_videos

        return report_videos(args.run, args.output)
    from ray_fer.train.runs import report_run

    return report_run(args.run)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="label a few image or video files and show the top probabilities")
    p.add_argument("--model", default="fer-photos", help=MODEL_HELP)
    p.add_argument("images", nargs="+", metavar="FILE", help="image or video files (local or s3://)")
    p.add_argument("--tta", default="none", help="test-time augmentation: none, flip or tencrop (default: none)")
    p.add_argument("--top", type=int, default=3, help="probabilities shown per image (default: 3)")
    p.add_argument("--faces", default="auto", help=FACES_HELP)
    p.add_argument("--annotate", metavar="DIR", help="write each image with its faces' boxes and labels drawn "
                   "into DIR (local or s3://)")
    p.add_argument("--fps", type=float, default=2.0, help="videos: frames sampled per second (default 2; 0: every "
                   "frame); their faces get tracks, and --annotate writes the sampled frames as an .mp4")
    p.set_defaults(func=_predict)


def _predict(args: argparse.Namespace) -> dict[str, Any]:
    from ray_fer.label.predict import format_predictions, predict_files

    result = predict_files(args.model, args.images, tta=args.tta, top=args.top, faces=args.faces,
                           annotate=args.annotate, fps=args.fps)
    print(format_predictions(result), flush=True)
    return result


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a model bundle elsewhere, optionally with float16 weights (checked)")
    p.add_argument("--model", required=True, help="model.pt written by `ray-fer train`, its run folder, or fer2013")
    p.add_argument("--output", required=True, help="path or s3:// URI of the bundle to write")
    p.add_argument("--half", action="store_true", help="store the weights as float16 (half the size); needs --check-data")
    p.add_argument("--check-data", help="labelled image folder on which the exported labels must agree with the "
                   "original's on >= 99.9%% of images (nothing is written otherwise)")
    p.add_argument("--blend-with", metavar="MODEL", help="write the weight-space average of --model and MODEL "
                   "(WiSE-FT: a fine-tune and the model it started from, e.g. fer2013)")
    p.add_argument("--alpha", type=float, default=0.5, help="--model's share of the blend (default 0.5)")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> dict[str, Any]:
    from ray_fer.label.export import export_model

    return export_model(args.model, args.output, half=args.half, check_data=args.check_data,
                        blend_with=args.blend_with, alpha=args.alpha)


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="two evaluations side by side, per class; or two models on several data sets")
    p.add_argument("a", metavar="A", help="metrics.json of the first evaluation (or its folder), or a folder of "
                   "evaluations (e.g. the eval/ folder beside a model)")
    p.add_argument("b", metavar="B", help="the same for the second model")
    p.set_defaults(func=_compare)


def _compare(args: argparse.Namespace) -> dict[str, Any]:
    from ray_fer.metrics import compare_metrics
    from ray_fer.report import format_comparison, format_set_comparison, load_evaluations, pair_evaluations

    evals_a, evals_b = load_evaluations(args.a), load_evaluations(args.b)
    if len(evals_a) == 1 and len(evals_b) == 1:
        a, b = evals_a[0], evals_b[0]
        cmp = compare_metrics(a, b)
        print(format_comparison(a, b, cmp, names=(args.a, args.b)), flush=True)
        return cmp
    pairs = pair_evaluations(evals_a, evals_b)
    if not pairs:
        raise UserError(f"{args.a!r} and {args.b!r} share no evaluation of the same data with the same --tta and "
                        "--faces; evaluate both models on the same folders first")
    print(format_set_comparison(pairs, names=(args.a, args.b)), flush=True)
    return {"sets": [{"data": a.get("data"), "tta": a.get("tta"), "faces": a.get("faces", "whole"),
                      **compare_metrics(a, b)} for a, b in pairs]}


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="fit a model's confidence (temperature) from its evaluations, optionally "
                       "shift its labels along the training prior; writes a new bundle")
    p.add_argument("--model", required=True, help="model.pt written by `ray-fer train`, its run folder, or fer2013")
    p.add_argument("evaluations", nargs="+", metavar="EVAL", help="folders that `ray-fer evaluate` wrote for this "
                   "model (e.g. FER2013 val, and real photos with --faces detect)")
    p.add_argument("--output", required=True, help="path or s3:// URI of the calibrated bundle to write")
    p.add_argument("--shift", type=float, default=0.0, help="logits += SHIFT x log(training prior) before the "
                   "temperature: < 0 towards balanced classes, > 0 towards the training set's frequent ones "
                   "(default 0: the temperature only; the printed table shows each shift's figures)")
    p.set_defaults(func=_calibrate)


def _calibrate(args: argparse.Namespace) -> dict[str, Any]:
    from ray_fer.label.calibrate import calibrate_model

    return calibrate_model(args.model, args.evaluations, args.output, shift=args.shift)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the problem, a close match for a mistyped option, where help is."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        self._argv = list(sys.argv[1:] if args is None else args)  # to suggest the subcommand's own options
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            known = _option_strings(self, getattr(self, "_argv", []))
            hints = [match[0] for word in message.split(":", 1)[1].split()
                     if word.startswith("--")
                     and (match := difflib.get_close_matches(word.split("=")[0], known, n=1, cutoff=0.75))]
            if hints:
                message += f" (did you mean {', '.join(hints)}?)"
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def _option_strings(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """The --options of `parser` and of the subcommand named in argv (of every one if none is)."""
    options: list[str] = []
    for action in parser._actions:
        options += [o for o in action.option_strings if o.startswith("--")]
        if isinstance(action, argparse._SubParsersAction):
            named = [action.choices[a] for a in argv if a in action.choices][:1]
            for child in named or action.choices.values():
                options += _option_strings(child, argv)
    return sorted(set(options))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ray-fer", description="Facial expression recognition at scale on Ray: train, label, evaluate.")
    verbose_help = "show Ray's own logs (execution plans, progress bars, Train's messages) and debug logging"
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_infer, _add_list, _add_evaluate, _add_report, _add_predict, _add_compare, _add_export,
                _add_calibrate):
        add(sub)
    for child in sub.choices.values():  # `ray-fer train -v` as well as `ray-fer -v train`
        child.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help)
    return parser


def run(func: Callable[[], dict[str, Any]], prog: str = "ray-fer") -> int:
    """Call `func`, print its summary as one JSON line; user errors become one line and exit 2."""
    error: UserError | None = None
    try:
        summary = func()
    except UserError as e:
        error = e
    finally:  # before the last line: logs that workers still forward (a second predictor's) come first
        _flush_ray_logs()
    if error is not None:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
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
    console.setup(args.verbose)  # before anything imports Ray
    return run(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
