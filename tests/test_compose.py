"""tcpade composed with what users combine it with: half-precision transformers, torchao
int8 weight-only quantization and diffusers' layerwise fp8 storage casting.

Model CPU offload is not tested here: enable_model_cpu_offload() raises "requires
accelerator" on a CPU-only machine (checked with diffusers 0.42.1); see README."""

import pytest
import torch

pytest.importorskip("diffusers")

from helpers import rule_fast, rule_slow  # noqa: E402

from tcpade.tools.tiny import flux_pipeline as _flux_pipeline  # noqa: E402

import tcpade  # noqa: E402
from tcpade import TCPadeConfig  # noqa: E402  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@torch.no_grad()
def test_half_precision_transformer(dtype):
    pipe, generate = _flux_pipeline(dtype)
    pipe.set_progress_bar_config(disable=True)
    base = generate(20)
    rt = tcpade.apply(pipe, rule_slow())
    try:
        out = generate(20)
        s = tcpade.summary(pipe)
        assert len(s.computed("cond")) == 9 and len(s.computed("uncond")) == 9
        assert rt.branches["cond"].history.ring.dtype == dtype  # history kept in the model's dtype
        assert torch.isfinite(out).all()
    finally:
        tcpade.remove(pipe)
    assert torch.equal(generate(20), base)


@torch.no_grad()
def test_layerwise_fp8_storage_casting():
    pipe, generate = _flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    base = generate(20)
    tcpade.apply(pipe, rule_fast())
    try:
        out = generate(20)
        s = tcpade.summary(pipe)
        assert len(s.computed("cond")) == 7
        assert torch.isfinite(out).all()
    finally:
        tcpade.remove(pipe)
    # Removing tcpade leaves diffusers' own casting hooks in place and working.
    assert torch.equal(generate(20), base)


@torch.no_grad()
def test_torchao_int8_weight_only():
    quant = pytest.importorskip("torchao.quantization")
    pipe, generate = _flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    quant.quantize_(pipe.transformer, quant.Int8WeightOnlyConfig())
    base = generate(20)
    tcpade.apply(pipe, rule_slow())
    try:
        out = generate(20)
        assert tcpade.summary(pipe).computed("cond") == [0, 1, 2, 3, 4, 8, 12, 16, 19]
        assert torch.isfinite(out).all()
        assert ((out - base).norm() / base.norm()).item() < 0.05  # measured 0.004
    finally:
        tcpade.remove(pipe)
    assert torch.equal(generate(20), base)
