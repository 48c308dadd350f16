"""`ray-fer export`: write a model bundle (a run's, or any bundle) to a new place, optionally with
float16 weights, after checking on a labelled folder that the stored precision keeps the labels.

This is how the packaged model (ray_fer/models/fer2013.pt) is made from its training run:

    ray-fer export --model runs/fer2013-cpu --output ray_fer/models/fer2013.pt --half \\
        --check-data ../shared/data/fer2013/val

The check runs both bundles in float32 in this process (no Ray) over every image of the folder,
so the only difference it measures is the rounding of the stored weights.

`--blend-with MODEL --alpha A` writes the weight-space average (1 - A) x MODEL + A x the model
(WiSE-FT, Wortsman et al. 2022): a fine-tune blended with the model it started from keeps more of
what the start knew (FER2013) while keeping much of what the fine-tune learnt (real photos). The
two must share the architecture, stem stride and preprocessing; batch-norm statistics are averaged
as the weights are. The result carries the fine-tune's config, metrics and class counts, and
`blend` (the other model's id and alpha).
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
    blend_with: str | None = None,
    alpha: float = 0.5,
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
    summary: dict[str, Any] = {"model": source, "model_id": source_id, "output": output,
                               "weights": "float16" if half else "as stored"}
    if blend_with is not None:
        other, other_id = load_bundle(resolve_model(blend_with))
        bundle = blend(bundle, other, alpha, other_id)
        summary |= {"blend_with": blend_with, "blend_with_id": other_id, "alpha": alpha}
    exported = bundle.half() if half else bundle
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


def blend(bundle, other, alpha: float, other_id: str):
    """(1 - alpha) x other + alpha x bundle, tensor by tensor (see the module's docstring)."""
    import dataclasses

    if not 0 <= alpha <= 1:
        raise UserError(f"--alpha must be in [0, 1] (the share of --model in the blend), got {alpha}")
    same = ("architecture", "stem_stride", "image_size", "decode_size", "classes", "mean", "std")
    differ = [k for k in same if getattr(bundle, k) != getattr(other, k)]
    if differ or bundle.state_dict.keys() != other.state_dict.keys():
        raise UserError(f"cannot blend models that differ in {', '.join(differ) or 'their weights names'}: blend a "
                        "fine-tune with the model it was fine-tuned from")
    state = {}
    for name, mine in bundle.state_dict.items():
        theirs = other.state_dict[name]
        if mine.shape != theirs.shape:
            raise UserError(f"cannot blend: {name} is {tuple(mine.shape)} in one model, {tuple(theirs.shape)} in the other")
        if mine.is_floating_point():
            state[name] = ((1 - alpha) * theirs.float() + alpha * mine.float()).to(mine.dtype)
        else:  # batch-norm counters: the fine-tune's
            state[name] = mine
    return dataclasses.replace(bundle, state_dict=state, calibration={},
                               config=dict(bundle.config, blend={"with": other_id, "alpha": alpha}))
