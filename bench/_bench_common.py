"""Shared pieces of the kernel benchmarks (bench_update.py, bench_predict.py) and gpu_check.py.

* The real models' configs (diffusers constructor arguments) and the hidden-state shape each
  gives at its benchmark resolution: the shapes of every benchmark come from here.
* The contenders of each op: tcpade's kernel (Triton on CUDA, the C++ extension on CPU), the
  same math as separate eager torch ops, torch.compile of that math, and the published
  implementation's way (its sequence of unfused tensor ops, with its host syncs).
* Timing: triton.testing.do_bench medians with p20/p80 on CUDA (CUDA-graph replay for the
  kernel time), interleaved perf_counter loops on CPU; input sets rotated when one set fits
  in the last-level cache; the device-to-device copy bandwidth that the % column divides by.
"""

from __future__ import annotations

import collections
import datetime
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from tcpade import coef as K
from tcpade import ops, reference
from tcpade.core.layout import PAPER

# ------------------------------------------------------------------ models and their shapes
# Constructor arguments of the diffusers transformers as in the published checkpoints'
# transformer/config.json (FLUX.1-dev; Wan2.1-T2V-1.3B-Diffusers; facebook/DiT-XL-2-256).
FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
WAN_1_3B = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
DIT_XL_2 = dict(
    num_attention_heads=16,
    attention_head_dim=72,
    in_channels=4,
    out_channels=8,
    num_layers=28,
    sample_size=32,
    patch_size=2,
    num_embeds_ada_norm=1000,
    norm_type="ada_norm_zero",
)
FLUX_VAE_SCALE = 8  # FLUX VAE: 8x spatial downsampling, latents packed 2x2 -> 64 channels
WAN_VAE_STRIDE = (4, 8, 8)  # Wan VAE: 4x temporal (first frame alone), 8x spatial
DIT_VAE_SCALE = 8
FLUX_TEXT_TOKENS = 512  # T5 max_sequence_length of FluxPipeline
WAN_TEXT_TOKENS = 512


def flux_tokens(height: int, width: int, cfg=FLUX_DEV) -> int:
    """Image tokens of FLUX at height x width: 8x VAE, then 2x2 packing (patch_size 1 after it)."""
    return (height // FLUX_VAE_SCALE // 2) * (width // FLUX_VAE_SCALE // 2) // cfg["patch_size"] ** 2


def flux_hidden(height: int, width: int, cfg=FLUX_DEV) -> tuple:
    return (1, flux_tokens(height, width, cfg), cfg["num_attention_heads"] * cfg["attention_head_dim"])


def wan_latent(frames: int, height: int, width: int) -> tuple:
    st, sh, sw = WAN_VAE_STRIDE
    return ((frames - 1) // st + 1, height // sh, width // sw)


def wan_hidden(frames: int, height: int, width: int, cfg=WAN_1_3B) -> tuple:
    f, h, w = wan_latent(frames, height, width)
    pt, ph, pw = cfg["patch_size"]
    return (1, (f // pt) * (h // ph) * (w // pw), cfg["num_attention_heads"] * cfg["attention_head_dim"])


def dit_hidden(res: int, batch: int = 2, cfg=DIT_XL_2) -> tuple:
    side = res // DIT_VAE_SCALE // cfg["patch_size"]
    return (batch, side * side, cfg["num_attention_heads"] * cfg["attention_head_dim"])


# Hidden-state shapes (what tcpade's ops see) at the benchmark resolutions.
SHAPES = {
    "flux1024": flux_hidden(1024, 1024),  # (1, 4096, 3072)
    "flux512": flux_hidden(512, 512),  # (1, 1024, 3072)
    "wan480p81f": wan_hidden(81, 480, 832),  # (1, 32760, 1536)
    "dit256cfg2": dit_hidden(256, batch=2),  # (2, 256, 1152): CFG as a batch of 2
}
TARGET_SHAPE = "flux1024"
# Small shapes for CPU runs (--quick) and dry runs: odd sizes, nothing a multiple of a block.
QUICK_SHAPES = {"small": (1, 64, 96), "odd": (2, 37, 129)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# -------------------------------------------------------------------------- the op cases
@dataclass(frozen=True)
class Case:
    """One op configuration: what is timed and the bytes it must move."""

    name: str
    op: str  # "update" or "predict"
    variant: Optional[str] = None
    store: bool = False
    gamma: float = 0.0  # > 0: an h_prev buffer and the input-change correction
    probe: bool = False
    tensors: int = 0  # hidden-state-sized tensors read + written at least once
    published: bool = False  # the published code has this op


# update: reads h_in, h_out, R1, R2, writes R. predict (write_out): reads h_in and the
# residuals the variant needs (reuse R1; paper, linear R1, R2; rational R1-R3), writes h_out;
# "paper+" is the call as the paper's method makes it: + h_prev read and written, + the
# prediction stored in the ring (the published code appends every prediction to its history).
UPDATE_CASES = [Case("update", "update", tensors=5, published=True)]
PREDICT_CASES = [
    Case("paper", "predict", "paper", tensors=4),
    Case("paper+", "predict", "paper", store=True, gamma=PAPER.gamma, tensors=7, published=True),
    Case("rational", "predict", "rational", tensors=5),
    Case("reuse", "predict", "reuse", tensors=3),
    Case("linear", "predict", "linear", tensors=4),
]
ALL_CASES = {c.name: c for c in UPDATE_CASES + PREDICT_CASES}

# Schedule times of R1, R2, R3 and the target (a middle step of a shifted flow-matching
# schedule at 20 steps): a non-uniform grid, so the time-aware variants do real work.
TIMES = (0.61, 0.74, 0.83)
T_TARGET = 0.45
SLOTS = (2, 1, 0)  # R1 in ring slot 2, R2 in 1, R3 in 0 (= the write slot)


def coef_values(case: Case, stage: str = "middle") -> list:
    if case.op != "predict":
        return []
    return K.build_coef(case.variant, stage, TIMES, T_TARGET, 3, 3, gamma=case.gamma)


@dataclass
class Inputs:
    h_in: torch.Tensor
    h_out: torch.Tensor
    ring: torch.Tensor
    slots: torch.Tensor  # on the device (tcpade's ops)
    h_prev: Optional[torch.Tensor]
    coef: torch.Tensor  # float32 on the device (tcpade's ops)
    cf: tuple  # the same coefficients as Python floats (the torch math)
    hist: collections.deque  # the published code's residual list (newest last)


def make_inputs(case: Case, shape, dtype, device, seed=0) -> Inputs:
    """Random data shaped like a trajectory: residuals drift smoothly (so the predictors'
    branches, the trust region and the TSI see realistic values), never zeros."""
    g = torch.Generator(device=device).manual_seed(seed)  # drawn on the device: Wan-sized fp32 sets are 200 MB

    def r(scale=1.0):
        return (torch.randn(shape, generator=g, device=device) * scale).to(dtype)

    base, vel = r(), r(0.2)
    ring = torch.stack([base - 2 * vel + r(0.05), base - vel + r(0.05), base])  # slot 2 = R1 (newest)
    h_in = r()
    cfv = coef_values(case)
    hist = collections.deque([ring[SLOTS[2]].clone(), ring[SLOTS[1]].clone(), ring[SLOTS[0]].clone()], maxlen=4)
    return Inputs(
        h_in=h_in,
        h_out=(h_in.float() + base.float() + r(0.05).float()).to(dtype),
        ring=ring,
        slots=torch.tensor(SLOTS, dtype=torch.int32, device=device),
        h_prev=(h_in.float() + r(0.05).float()).to(dtype) if case.gamma else None,
        coef=K.coef_tensor(cfv, device) if cfv else torch.empty(0),
        cf=tuple(cfv),
        hist=hist,
    )


# ------------------------------------------------------------- the same math, eager torch
# tcpade.core.reference's own math, called with the slot order and the coefficients as Python
# values, so that it neither reads a device tensor back nor graph-breaks: a fair input for
# torch.compile and for CUDA-graph capture.


def math_update(h_in, h_out, ring, slots: tuple, probe: bool = False):
    return reference.update_math(h_in, h_out, ring, slots, None, probe)


def math_predict(h_in, ring, slots: tuple, cf: tuple, h_prev, variant: str, store: bool, write_out: bool = True):
    return reference.predict_math(h_in, ring, slots, cf, h_prev, variant, store, write_out)


# ---------------------------------------------------- the published implementation's way
# docs/method.md sections 2-4 and 9: a Python list of residuals, fp32 temporaries, the TSI from
# whole-tensor norms read back to the host, and the predictor's fallbacks decided by host-side
# checks of the whole tensor (torch.isfinite(...).all() -> a sync each). This is deliberately
# a second copy of the paper predictor: the published code's SEQUENCE of separate tensor ops
# (the unfused baseline the kernels are timed against). Its constants are tcpade.core.layout.PAPER
# (tcpade.core.reference.paper_pade is the same formula fused differently); tests/test_bench.py
# checks that it predicts what tcpade.core.reference predicts on finite data (where its
# whole-tensor fallbacks do not trigger).


def published_update(h_in, h_out, hist: collections.deque):
    """A computed step: append the residual and compute the TSI of the three newest."""
    residual = (h_out.float() - h_in.float()).to(h_in.dtype)
    hist.append(residual)
    if len(hist) < 3:
        return float("nan")
    r1, r2, r3 = hist[-1].float(), hist[-2].float(), hist[-3].float()
    d1 = r2 - r3
    d2 = r1 - r2
    n1 = torch.norm(d1)
    n2 = torch.norm(d2)
    u1 = d1 / (n1 + 1e-8)
    u2 = d2 / (n2 + 1e-8)
    return 0.5 * torch.norm(u1 - u2).item()  # host sync: the skip decision is made on the host


def published_predict(h_in, h_prev, hist: collections.deque, stage: str):
    """A skipped step as the paper's code runs it: predict, correct for the input change,
    write h_out, append the prediction to the history."""
    P = PAPER
    r1, r2 = hist[-1].float(), hist[-2].float()
    _, c1, c2 = P.stage_weights[stage]
    if stage == "early":
        pred = c1 * r1 + c2 * r2
    else:
        diff = torch.abs(r1 - r2)
        mag = 0.5 * (torch.abs(r1) + torch.abs(r2))
        rel = diff / (mag + P.s_eps)
        s = torch.exp(-P.s_rate * rel)
        num = P.num_r1 * s * r1 - s * r2
        a1 = -P.den_a * s
        den = 1.0 + a1  # the published curvature flag is always 1
        small = torch.abs(den) < P.den_min
        den = torch.where(
            small, torch.where(den >= 0, torch.full_like(den, P.den_min), torch.full_like(den, -P.den_min)), den
        )
        p = num / den
        avg = P.avg_r1 * r1 + P.avg_r2 * r2
        m = torch.maximum(P.trust_d * diff, P.trust_mag * mag)
        p = avg + torch.clamp(p - avg, min=-m, max=m)
        beta = P.beta_s * s + P.beta_0
        pred = beta * p + (1.0 - beta) * avg
        if not torch.isfinite(pred).all():  # host sync
            pred = r1 + P.fb1 * (r1 - r2)
            if not torch.isfinite(pred).all():  # host sync
                ws = P.wavg[: len(hist)]
                pred = sum(w * h.float() for w, h in zip(ws, reversed(hist))) / sum(ws)
        if stage == "late":  # weights (1, c1, -c1): + c1 (R1 - R2)
            pred = pred + c1 * (r1 - r2)
    delta = h_in.float() - h_prev.float()
    pred = pred + P.gamma * delta
    h_prev.copy_(h_in)
    out = (h_in.float() + pred).to(h_in.dtype)
    hist.append(pred.to(h_in.dtype))
    return out


# ------------------------------------------------------------------------- the contenders
PROVIDERS = ("tcpade", "eager", "compiled", "published")


def tcpade_fn(case: Case, x: Inputs) -> Callable:
    """tcpade's op (Triton on CUDA, the C++ extension on CPU), through torch.ops.tcpade."""
    if case.op == "update":
        return lambda: ops.update(x.h_in, x.h_out, x.ring, x.slots, x.h_prev, case.probe)
    return lambda: ops.predict(x.h_in, x.ring, x.slots, x.coef, x.h_prev, case.variant, case.store, True)


def launch_fn(case: Case, x: Inputs, **launch) -> Callable:
    """The Triton kernel with an explicit launch shape (block, num_warps): the sweep that
    launch-parameter tuning needs as GPU evidence."""
    from tcpade import kernels

    if case.op == "update":
        return lambda: kernels.update(x.h_in, x.h_out, x.ring, x.slots, x.h_prev, case.probe, **launch)
    return lambda: kernels.predict(x.h_in, x.ring, x.slots, x.coef, x.h_prev, case.variant, case.store, True, **launch)


SWEEP = [dict(block=b, num_warps=w) for b in (2048, 4096, 8192) for w in (4, 8)]


def math_fn(case: Case, x: Inputs, compiled: Optional[Callable] = None) -> Callable:
    if case.op == "update":
        f = compiled or math_update
        return lambda: f(x.h_in, x.h_out, x.ring, SLOTS, case.probe)
    f = compiled or math_predict
    return lambda: f(x.h_in, x.ring, SLOTS, x.cf, x.h_prev, case.variant, case.store, True)


def published_fn(case: Case, x: Inputs) -> Optional[Callable]:
    if not case.published:
        return None
    # Each call appends to the history; the wrapper drops that entry again (a list pop, no
    # tensor work) so that thousands of timed calls keep predicting from the same data
    # instead of extrapolating their own predictions until they overflow.
    if case.op == "update":

        def run():
            tsi = published_update(x.h_in, x.h_out, x.hist)
            x.hist.pop()
            return tsi

        return run

    def run():
        out = published_predict(x.h_in, x.h_prev, x.hist, "middle")
        x.hist.pop()
        return out

    return run


_COMPILED: Dict[str, Callable] = {}


def compiled_math(op: str) -> Callable:
    """torch.compile of the math (fullgraph; one compile per op, recompiled per shape/dtype)."""
    import torch._dynamo.config as dcfg

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dcfg, name):
            setattr(dcfg, name, max(getattr(dcfg, name), 256))
    if op not in _COMPILED:
        fn = math_update if op == "update" else math_predict
        _COMPILED[op] = torch.compile(fn, fullgraph=True, dynamic=False)
    return _COMPILED[op]


# ----------------------------------------------------------------------------------- timing
def quantiles(ts: Sequence[float]):
    """(median, p20, p80) of a list of milliseconds."""
    ts = sorted(ts)

    def q(p):
        k = p * (len(ts) - 1)
        lo, hi = math.floor(k), math.ceil(k)
        return ts[lo] + (ts[hi] - ts[lo]) * (k - lo)

    return statistics.median(ts), q(0.2), q(0.8)


def rotating(fns: List[Callable]) -> Callable:
    """One callable that runs fns[0], fns[1], ... in turn (rotates the input sets)."""
    it = [0]

    def run():
        i = it[0]
        it[0] = (i + 1) % len(fns)
        return fns[i]()

    return run


def n_sets(bytes_per_set: int, device: str) -> int:
    """Input sets to rotate so that one pass over all of them is >= 4x the last-level cache
    (the device's L2 on a GPU, 64 MiB assumed on a CPU): timings then measure memory, not
    cache. FLUX-sized sets are past it with one."""
    cache = 64 << 20
    if device == "cuda":
        cache = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", cache) or cache
    return int(min(32, max(1, math.ceil(4 * cache / max(1, bytes_per_set)))))


def time_cuda(fn: Callable, graph: bool, rep_ms: int = 50) -> tuple:
    """(median, p20, p80) ms by triton.testing.do_bench, or its CUDA-graph replay variant
    (the GPU time of the kernels alone, without the host's launch work in between)."""
    import triton

    q = [0.5, 0.2, 0.8]
    if graph:
        return tuple(triton.testing.do_bench_cudagraph(fn, rep=rep_ms, quantiles=q))
    return tuple(triton.testing.do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms, quantiles=q))


CPU_CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def time_cpu_interleaved(fns: List[Callable], reps: int, warmup: int, clock: str = "wall") -> List[tuple]:
    """Each fn reps times, interleaved rep by rep so that a shared machine's slow drifts hit
    all of them alike; one (median, p20, p80) in ms per fn.

    clock="thread": the CPU time of this thread (CLOCK_THREAD_CPUTIME_ID) instead of wall
    time. Only meaningful with one thread everywhere (torch, OpenMP): then it leaves out the
    time other processes hold the core, which on a shared, oversubscribed host otherwise
    dominates every wall-clock median."""
    now = CPU_CLOCKS[clock]
    for fn in fns:
        for _ in range(warmup):
            fn()
    ts = [[] for _ in fns]
    for _ in range(reps):
        for k, fn in enumerate(fns):
            t0 = now()
            fn()
            ts[k].append((now() - t0) * 1e3)
    return [quantiles(t) for t in ts]


def copy_bandwidth(device: str, nbytes: int = 1 << 30, reps: int = 20, clock: str = "wall") -> float:
    """GB/s of a large device-to-device copy, counting bytes read + written (the ceiling the
    % column divides by). 1 GiB on a GPU, far past its L2."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    if device == "cuda":
        ms = time_cuda(lambda: dst.copy_(src), graph=False, rep_ms=100)[0]
    else:
        ms = time_cpu_interleaved([lambda: dst.copy_(src)], reps, 2, clock)[0][0]
    src = dst = None  # free the 2 GiB before the benchmarks allocate
    return 2 * n * 4 / (ms * 1e-3) / 1e9


# --------------------------------------------------------------------------- one benchmark
def bench_case(
    case: Case,
    shape_name: str,
    shape,
    dname: str,
    device: str,
    copy_gbs: float,
    providers: Sequence[str] = PROVIDERS,
    reps: int = 20,
    warmup: int = 3,
    log: Callable = lambda s: None,
    sweep: bool = False,
    clock: str = "wall",
) -> dict:
    """Time one case at one shape and dtype under every provider; one result row. sweep
    (CUDA): also time tcpade's kernel at each launch shape of SWEEP and keep the best."""
    dtype = DTYPES[dname]
    elt = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    nbytes = case.tensors * elt
    sets = [make_inputs(case, shape, dtype, device, seed=i) for i in range(n_sets(2 * nbytes, device))]
    row = dict(case=case.name, shape=shape_name, dims=list(shape), dtype=dname, MB=nbytes / 1e6, nsets=len(sets))
    fns = {}
    if "tcpade" in providers:
        fns["tcpade"] = rotating([tcpade_fn(case, x) for x in sets])
    if "eager" in providers:
        fns["eager"] = rotating([math_fn(case, x) for x in sets])
    if "compiled" in providers:
        f = compiled_math(case.op)
        fns["compiled"] = rotating([math_fn(case, x, f) for x in sets])
        fns["compiled"]()  # compile outside the timing
    if "published" in providers and case.published:
        fns["published"] = rotating([published_fn(case, x) for x in sets])
    if device == "cuda":
        for name, fn in fns.items():
            # CUDA-graph replay for the kernel time of everything without host syncs (the
            # published code reads back to the host inside, so it is timed as it runs).
            graph = name in ("tcpade", "eager", "compiled")
            try:
                row[name] = time_cuda(fn, graph=graph)
            except Exception as exc:  # one provider that cannot be captured must not end the run
                row.setdefault("notes", []).append(f"{name}: graph replay failed ({type(exc).__name__}: {exc}); "
                                                   "timed eagerly")  # fmt: skip
                torch.cuda.synchronize()
                row[name] = time_cuda(fn, graph=False)
            if name == "tcpade":
                row["tcpade_call"] = time_cuda(fn, graph=False)
            torch.cuda.synchronize()
        if sweep and "tcpade" in fns:
            best = (row["tcpade"][0], "default")
            for launch in SWEEP:
                try:
                    t = time_cuda(rotating([launch_fn(case, x, **launch) for x in sets]), graph=True)[0]
                except Exception as exc:  # a shape the kernel refuses is a result, not the end of the run
                    row.setdefault("notes", []).append(f"launch {launch}: {type(exc).__name__}: {exc}")
                    continue
                if t < best[0]:
                    best = (t, ",".join(f"{k}={v}" for k, v in launch.items()))
            row["best_launch"] = dict(
                ms=best[0], launch=best[1], pct_copy=100.0 * nbytes / (best[0] * 1e-3) / 1e9 / copy_gbs
            )
    else:
        names = list(fns)
        for name, t in zip(names, time_cpu_interleaved([fns[n] for n in names], reps, warmup, clock)):
            row[name] = t
    for name in PROVIDERS:
        if name in row:
            row[name + "_GBps"] = nbytes / (row[name][0] * 1e-3) / 1e9
            row[name + "_pct_copy"] = 100.0 * row[name + "_GBps"] / copy_gbs
    log(
        f"  {dname} {shape_name:11s} {case.name:8s} "
        + "  ".join(f"{n} {row[n][0]:.4g} ms" for n in PROVIDERS + ("tcpade_call",) if n in row)
    )
    del sets, fns
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def run_cases(
    cases: Sequence[Case],
    shapes: Dict[str, tuple],
    dtypes: Sequence[str],
    device: str,
    copy_gbs: float,
    providers: Sequence[str] = PROVIDERS,
    compile_at: Optional[Callable[[str, str, str], bool]] = None,
    reps: int = 20,
    log: Callable = lambda s: None,
    sweep: bool = False,
    clock: str = "wall",
) -> List[dict]:
    """Every case x shape x dtype; compile_at(shape_name, dtype, case_name) limits the compiled
    provider (each shape/dtype/case is one more inductor compile, seconds each)."""
    rows = []
    for dname in dtypes:
        for sname, shape in shapes.items():
            for case in cases:
                prov = [
                    p for p in providers if p != "compiled" or compile_at is None or compile_at(sname, dname, case.name)
                ]
                rows.append(
                    bench_case(
                        case, sname, shape, dname, device, copy_gbs, prov, reps, log=log, sweep=sweep, clock=clock
                    )
                )
    return rows


# ------------------------------------------------------------------------------ reporting
def fmt_t(t) -> str:
    return "-" if t is None else f"{t[0]:.4g} ({t[1]:.3g}-{t[2]:.3g})"


def markdown(rows: List[dict], device: str) -> str:
    kern = "tcpade (Triton) ms, graph" if device == "cuda" else "tcpade (C++) ms"
    head = [
        "| dtype | shape | op | MB moved | " + kern + " | GB/s | % copy | eager ms | compiled ms | published ms "
        "| x eager | x compiled | x published |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines = list(head)
    for r in rows:
        t = r.get("tcpade")

        def ratio(name, r=r, t=t):
            return f"{r[name][0] / t[0]:.1f}" if t and name in r else "-"

        lines.append(
            f"| {r['dtype']} | {r['shape']} | {r['case']} | {r['MB']:.1f} | {fmt_t(t)} | "
            f"{r.get('tcpade_GBps', float('nan')):.0f} | {r.get('tcpade_pct_copy', float('nan')):.0f}% | "
            f"{fmt_t(r.get('eager'))} | {fmt_t(r.get('compiled'))} | {fmt_t(r.get('published'))} | "
            f"{ratio('eager')} | {ratio('compiled')} | {ratio('published')} |"
        )
    swept = [r for r in rows if "best_launch" in r]
    if swept:
        lines += ["", "Launch-shape sweep (best CUDA-graph time of tcpade's kernel):", ""]
        for r in swept:
            b = r["best_launch"]
            lines.append(
                f"- {r['dtype']} {r['shape']} {r['case']}: {b['launch']} {b['ms']:.4f} ms ({b['pct_copy']:.0f}% copy)"
            )
    return "\n".join(lines) + "\n"


def zoo_times(model, steps: int) -> list:
    """The timesteps of a ``steps``-step run of zoo model ``model`` (its noise scheduler's): the axis
    tcpade.sample's runtime places the spaced rule on (``TCPadeConfig.time_spacing``)."""
    noise = model.noise_scheduler()
    noise.set_timesteps(steps)
    return [float(t) for t in noise.timesteps]


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict:
    info = dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        torch=torch.__version__,
        python=platform.python_version(),
        cpu=cpu_name(),
        cpus=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        loadavg_1m=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,  # other jobs on a shared host
    )
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_mem_GiB=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    else:
        native = ops._load_native()
        info["cpp_isa"] = native.isa() if native is not None and hasattr(native, "isa") else None
    return info


def parse_common(ap, default_shapes: str):
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small odd shapes, few reps (CPU runs, CI smoke)")
    ap.add_argument("--shapes", default=None, help=f"comma list of {list(SHAPES)} (default: {default_shapes})")
    ap.add_argument("--dtypes", default="fp32,bf16,fp16")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--compile-at", default="all", help="'all' or shape:dtype pairs, e.g. flux1024:bf16")
    ap.add_argument("--reps", type=int, default=None, help="CPU: timed reps per provider")
    ap.add_argument("--threads", type=int, default=2, help="CPU: torch.set_num_threads")
    ap.add_argument("--clock", choices=sorted(CPU_CLOCKS), default="wall",
                    help="CPU: 'thread' = this thread's CPU time (--threads 1, OMP_NUM_THREADS=1)")  # fmt: skip
    ap.add_argument("--sweep", action="store_true", help="CUDA: also sweep the kernels' launch shapes")
    ap.add_argument("--json", default=None, help="write the rows as JSON here")
    ap.add_argument("--md", default=None, help="write the markdown table here")


def main_common(args, cases: Sequence[Case], title: str) -> List[dict]:
    """The body of bench_update.py / bench_predict.py."""
    import json

    device = args.device
    if device == "cpu":
        torch.set_num_threads(args.threads)
    if args.clock == "thread":
        native = ops._load_native()
        omp = native.num_threads() if native is not None and hasattr(native, "num_threads") else 1
        if device != "cpu" or args.threads != 1 or omp != 1:
            raise SystemExit(
                f"--clock thread measures one thread's CPU time: it needs --device cpu, --threads 1 and "
                f"OMP_NUM_THREADS=1 (got device {device}, threads {args.threads}, C++ OpenMP threads {omp})"
            )
    if args.quick:
        shapes = dict(QUICK_SHAPES)
    else:
        names = (args.shapes or ",".join(SHAPES)).split(",")
        shapes = {n: SHAPES[n] for n in names}
    dtypes = args.dtypes.split(",")
    providers = args.providers.split(",")
    compile_at = None
    if args.compile_at != "all":
        pairs = {tuple(p.split(":")) for p in args.compile_at.split(",") if p}
        compile_at = lambda s, d, c: (s, d) in pairs  # noqa: E731
    reps = args.reps or (3 if args.quick else 20)
    copy_gbs = copy_bandwidth(device, nbytes=(64 << 20) if args.quick else (1 << 30), clock=args.clock)
    info = machine_info(device)
    info["copy_GBps"] = copy_gbs
    rows = run_cases(cases, shapes, dtypes, device, copy_gbs, providers, compile_at, reps,
                     log=lambda s: print(s, file=sys.stderr), sweep=args.sweep and device == "cuda",
                     clock=args.clock)  # fmt: skip
    where = info.get("gpu") or (
        f"{info['cpu']} ({info['cpus']} CPUs, C++ kernels {info.get('cpp_isa')}, load average "
        f"{info['loadavg_1m']} at the start)"
    )
    timing = (
        "triton.testing.do_bench medians (p20-p80); tcpade, eager and compiled replayed from a CUDA graph "
        "(kernel time), published timed as it runs (it syncs with the host)"
        if device == "cuda"
        else f"median (p20-p80) of {reps} interleaved reps, "
        + ("CPU time of the one thread (time.thread_time)" if args.clock == "thread" else "wall time")
    )
    md = (
        f"{title} on {where}; torch {info['torch']}, triton {info['triton']}, {info['date']}. "
        f"Copy bandwidth {copy_gbs:.0f} GB/s (read + write). {timing}. MB moved = the hidden-state tensors the op "
        "must read + write once; GB/s and % copy for tcpade.\n\n" + markdown(rows, device)
    )
    print(md)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(info=info, rows=rows), f, indent=1)
    return rows
