"""The one precision policy: what each setting picks for training and inference on each device.

GPU decisions are checked by answering torch's capability queries as a T4 (bf16 only emulated) and
as an A100 (native bf16) would: the decisions, not the kernels, which need a GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ray_fer import precision
from ray_fer.precision import autocast_dtype, cpu_has_native_bf16, exact_fp32

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


def test_explicit_settings_on_cpu():
    for training in (False, True):
        assert autocast_dtype("fp32", CPU, training=training) is None
        assert autocast_dtype("off", CPU, training=training) is None
        assert autocast_dtype("bf16", CPU, training=training) is torch.bfloat16
        assert autocast_dtype("fp16", CPU, training=training) is torch.float16


def test_auto_on_cpu_is_bf16_for_inference_only_where_native():
    assert autocast_dtype("auto", CPU) is (torch.bfloat16 if cpu_has_native_bf16() else None)
    assert autocast_dtype("auto", CPU, training=True) is None  # bf16 training is slower on CPUs
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    assert cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_unknown_setting_names_the_choices():
    with pytest.raises(ValueError, match="unknown precision 'fp8'; choose one of: auto, bf16, fp16, fp32, off"):
        autocast_dtype("fp8", CPU)


def _gpu(monkeypatch, *, native_bf16: bool) -> None:
    """Make torch answer as a GPU with or without native bf16. Like torch, the answer counts
    emulated bf16 as supported unless asked not to: a policy that took torch's default answer
    would pick bf16 on an older GPU too."""
    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return native_bf16 or including_emulation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)


@pytest.mark.parametrize("training", [False, True])
def test_auto_on_an_older_gpu_is_fp16_not_emulated_bf16(monkeypatch, training):
    _gpu(monkeypatch, native_bf16=False)
    assert autocast_dtype("auto", CUDA, training=training) is torch.float16


@pytest.mark.parametrize("training", [False, True])
def test_auto_on_a_newer_gpu_is_bf16(monkeypatch, training):
    _gpu(monkeypatch, native_bf16=True)
    assert autocast_dtype("auto", CUDA, training=training) is torch.bfloat16


def test_exact_fp32_turns_tf32_off_on_gpus_and_restores_it():
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32  # torch's flags are properties: set and restore by hand
    try:
        cudnn.allow_tf32 = matmul.allow_tf32 = True
        with exact_fp32(CUDA):
            assert not cudnn.allow_tf32 and not matmul.allow_tf32
        assert cudnn.allow_tf32 and matmul.allow_tf32
        with exact_fp32(CPU):  # nothing to change on CPUs
            assert cudnn.allow_tf32 and matmul.allow_tf32
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved


def test_training_uses_a_grad_scaler_exactly_for_fp16():
    from ray_fer.train.loop import grad_scaler

    assert grad_scaler(None, CPU) is None
    assert grad_scaler(torch.bfloat16, CPU) is None
    assert isinstance(grad_scaler(torch.float16, CPU), torch.amp.GradScaler)


def test_labelling_runs_the_model_in_the_policys_precision(monkeypatch, tiny_bundle):
    """The predictor takes its precision from the one policy: on a CPU with native bf16 "auto"
    labels in bf16, on one without in fp32, and "fp32" is fp32 everywhere."""
    from ray_fer.label.predictor import Predictor

    for native in (False, True):
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
        assert Predictor(tiny_bundle, device="cpu").autocast is (torch.bfloat16 if native else None)
        assert Predictor(tiny_bundle, device="cpu", precision="fp32").autocast is None
    assert precision.SETTINGS == ("auto", "bf16", "fp16", "fp32", "off")
