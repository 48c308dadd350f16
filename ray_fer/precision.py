"""One precision policy: which autocast dtype (bf16, fp16 or none) a device gets, for training
and for inference.

Settings: training's `train.amp` (auto | bf16 | fp16 | off) and labelling's `precision`
(auto | bf16 | fp32). "auto" means:

| | training | inference |
|---|---|---|
| GPU with native bf16 (Ampere and newer) | bf16 | bf16 |
| GPU without it (T4, V100) | fp16 (+ GradScaler) | fp16 |
| CPU with native bf16 (AVX512-BF16 / AMX) | none: bf16 training is slower on CPU | bf16 |
| other CPUs | none | none (autocast would emulate bf16) |

Measured on a 2-core AVX512-BF16 CPU (ML-NOTES): bf16 inference 1.7x fp32, bf16 training 0.5x.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

SETTINGS = ("auto", "bf16", "fp16", "fp32", "off")  # "off" and "fp32" both mean no autocast


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX512-BF16 or AMX), so bf16 autocast is faster.

    Elsewhere autocast emulates bf16 and is slower than fp32. torch's own check
    (`torch.ops.mkldnn._is_mkldnn_bf16_supported`) says yes for plain AVX-512 too, hence the flags.
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return bool({"avx512_bf16", "amx_bf16"} & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return False


def cuda_has_native_bf16() -> bool:
    """True on GPUs that compute bf16 natively (compute capability 8.0+, Ampere and newer).

    `torch.cuda.is_bf16_supported()` defaults to including emulation and says yes on T4 / V100,
    where bf16 runs emulated and slowly; fp16 is the fast half precision there.
    """
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def autocast_dtype(setting: str, device: torch.device, *, training: bool = False) -> torch.dtype | None:
    """The autocast dtype for a precision `setting` on `device`; None means plain fp32.

    See the module docstring for what "auto" picks. Raises ValueError on an unknown setting.
    """
    if setting not in SETTINGS:
        raise ValueError(f"unknown precision {setting!r}; choose one of: {', '.join(SETTINGS)}")
    if setting in ("fp32", "off"):
        return None
    if setting == "bf16":
        return torch.bfloat16
    if setting == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if cuda_has_native_bf16() else torch.float16
    if device.type == "cpu" and not training and cpu_has_native_bf16():
        return torch.bfloat16
    return None


@contextlib.contextmanager
def exact_fp32(device: torch.device) -> Iterator[None]:
    """Full fp32 matmuls and convolutions inside the block, also on GPUs that would use TF32.

    Ampere and newer run "fp32" convolutions as TF32 (10-bit mantissa) when cuDNN allows it,
    which would make a re-check meant to be fp32 no more exact than the bf16 result it checks.
    """
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
