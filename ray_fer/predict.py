"""`ray-fer predict`: label a few image files in this process (no Ray), with the top probabilities."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ray_fer import storage
from ray_fer.config import UserError
from ray_fer.images import check_tta


def predict_files(model: str, images: Sequence[str], *, tta: str = "none", top: int = 3) -> dict[str, Any]:
    """Label a few image files (local or s3://) in this process; returns the model id and one row per file.

    A missing file fails before the model loads; an undecodable one gets a row with its error.
    """
    import torch

    from ray_fer.decode import ImageError, decode_image
    from ray_fer.model import load_bundle
    from ray_fer.predictor import predict_probs
    from ray_fer.runs import resolve_model

    check_tta(tta)
    if top < 1:
        raise UserError(f"--top must be >= 1, got {top}")
    missing = [p for p in images if not storage.exists(p)]
    if missing:
        raise UserError(f"no such image file: {', '.join(missing)}")
    folders = [p for p in images if storage.is_dir(p)]
    if folders:
        raise UserError(f"{', '.join(folders)} is a folder; pass image files (for a labelled folder use "
                        "`ray-fer evaluate`, for a whole store `ray-fer infer`)")
    bundle, model_id = load_bundle(resolve_model(model))
    net = bundle.build_model()
    preset = bundle.eval_preset(channels_last=False)
    rows: list[dict[str, Any]] = [{"path": p} for p in images]
    decoded: list[tuple[int, np.ndarray]] = []
    for i, path in enumerate(images):
        try:
            decoded.append((i, decode_image(storage.read_bytes(path), bundle.decode_size)[0]))
        except (ImageError, OSError) as e:
            rows[i]["error"] = str(e)
    if decoded:
        pixels = torch.from_numpy(np.stack([px for _, px in decoded]))
        probs = torch.cat([predict_probs(net, preset, chunk, tta=tta) for chunk in pixels.split(64)])
        for (i, _), p in zip(decoded, probs):
            order = torch.argsort(p, descending=True)[:top].tolist()
            rows[i].update(label=bundle.classes[order[0]], confidence=round(float(p[order[0]]), 4),
                           top=[[bundle.classes[j], round(float(p[j]), 4)] for j in order])
    return {"model": model_id, "tta": tta, "predictions": rows}


def format_predictions(result: dict[str, Any]) -> str:
    """A plain-text table of `predict_files` rows: file, label, then the top probabilities."""
    width = max([len("file")] + [len(r["path"]) for r in result["predictions"]])
    lines = [f"{'file':<{width}}  {'label':<9} top probabilities"]
    for r in result["predictions"]:
        if "error" in r:
            lines.append(f"{r['path']:<{width}}  {'-':<9} error: {r['error']}")
        else:
            tops = "  ".join(f"{name} {p:.1%}" for name, p in r["top"])
            lines.append(f"{r['path']:<{width}}  {r['label']:<9} {tops}")
    return "\n".join(lines)

