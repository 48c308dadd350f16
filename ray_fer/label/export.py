"""`ray-fer export`: write a model bundle (a run's, or any bundle) to a new place, optionally with
float16 weights, after checking on a labelled folder that the stored precision keeps the labels.

This is how the packaged model (ray_fer/models/fer2013.pt) is made from its training run:

    ray-fer export --model runs/fer2013-cpu --output ray_fer/models/fer2013.pt --half \\
        --check-data ../shared/data/fer2013/val

The check runs both bundles in float32 in this process (no Ray) over every image of the folder,
so the only difference it measures is the rounding of the stored weights.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ray_fer.store import storage
from ray_fer.config import UserError

log = logging.getLogger(__name__)

MIN_AGREEMENT = 0.999  # share of images whose label must not change when the weights are rounded


def export_model(
    model: str,
    output: str,
    *,
    half: bool = False,
    check_data: str | None = None,
    min_agreement: float = MIN_AGREEMENT,
) -> dict[str, Any]:
    """Write `model` (a bundle, run folder or packaged name) to `output`; returns the summary.

    With `half` the floating-point weights are stored as float16. With `check_data` (a labelled
    image folder) the exported bundle's labels are compared with the original's on every image,
    and nothing is written when they agree on fewer than `min_agreement` of them.
    """
    from ray_fer.model import load_bundle, save_bundle
    from ray_fer.model_ref import resolve_model

    if half and check_data is None:
        raise UserError("--half needs --check-data FOLDER (a labelled image folder such as FER2013 val) to check "
                        "that float16 weights keep the labels")
    source = resolve_model(model)
    bundle, source_id = load_bundle(source)
    exported = bundle.half() if half else bundle
    summary: dict[str, Any] = {"model": source, "model_id": source_id, "output": output,
                               "weights": "float16" if half else "as stored"}
    if check_data is not None:
        check = _agreement(bundle, exported, check_data)
        summary |= check
        if check["agreement"] < min_agreement:
            raise UserError(
                f"the exported weights change {check['changed']} of {check['images']} labels on {check_data} "
                f"(agreement {check['agreement']:.4%} < {min_agreement:.2%}); export without --half")
    summary["output_model_id"] = save_bundle(exported, output)
    summary["bytes"] = storage.info(output).size
    log.info("exported %s -> %s (%s bytes)", source, output, f"{summary['bytes']:,}")
    return summary


def _agreement(original, exported, data: str) -> dict[str, Any]:
    """Labels and accuracy of two bundles on every decodable image of a labelled folder (float32)."""
    import torch

    from ray_fer.label.decode import ImageError, decode_image
    from ray_fer.label.evaluate import _list_labelled
    from ray_fer.label.predictor import predict_probs

    table = _list_labelled(data, None)
    pixels, truth = [], []
    for path, label in zip(table["path"].to_pylist(), table["label"].to_pylist()):
        try:
            pixels.append(decode_image(storage.read_bytes(path), original.decode_size)[0])
        except (ImageError, OSError):
            continue
        truth.append(int(label))  # list_image_folder gives class indices
    if not pixels:
        raise UserError(f"{data!r} holds no decodable labelled images to check the export with")
    x = torch.from_numpy(np.stack(pixels))
    y = torch.tensor(truth)
    labels = []
    for bundle in (original, exported):
        net, preset = bundle.build_model(), bundle.eval_preset()
        net = net.to(memory_format=torch.channels_last)
        with torch.inference_mode():
            probs = torch.cat([predict_probs(net, preset, chunk) for chunk in x.split(256)])
        labels.append(probs.argmax(dim=1))
    same = (labels[0] == labels[1])
    return {
        "check_data": data, "images": len(y), "changed": int((~same).sum()),
        "agreement": round(float(same.float().mean()), 6),
        "accuracy": round(float((labels[0] == y).float().mean()), 6),
        "exported_accuracy": round(float((labels[1] == y).float().mean()), 6),
    }
