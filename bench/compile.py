"""torch.compile with tcpade: eager and compiled (``fullgraph=True``), with and without tcpade.

For each model family (FLUX, Wan, DiT) and each way of running the transformer

* eager;
* full: ``torch.compile(transformer, fullgraph=True)`` (inductor);
* regional: ``transformer.compile_repeated_blocks(fullgraph=True)`` (each repeated block
  compiled on its own; DiT in diffusers 0.42.1 has no ``_repeated_blocks``, so its blocks
  are compiled one by one, which is what that method does);
* cudagraphs (``--device cuda`` only): ``torch.compile(transformer, mode="reduce-overhead",
  fullgraph=True)``: the compute and the skip variant are each one CUDA graph

and each tcpade setting

* off: the plain transformer;
* on: ``tcpade.apply(transformer, TCPadeConfig.slow(), num_steps=20)`` (9 of 20 computed,
  a fixed schedule: no host wait in the loop),

it runs one 20-step Euler loop as warm-up (compiling), then ``--reps`` loops under
``torch._dynamo.config.error_on_recompile=True``, and reports: the warm-up loop's time
minus a steady loop's (~ compile time), the time per step (median loop / steps; the loop is
timed with one device sync at its end, so waits inside it count; on CPU also the process's
CPU time per step, which a machine shared with other jobs inflates less than wall time), dynamo frames compiled
and recompiles logged in warm-up and in the steady loops, graph breaks, computed
block-stack passes, the Runtime's host waits per loop, and on CUDA the synchronising
calls per loop that ``torch.cuda.set_sync_debug_mode`` reports.

Sizes: ``tiny`` (CPU: ``tcpade.tools.tiny``'s models, 2-3 blocks; compile time dominates, the
per-step numbers are Python/launch overhead) or ``full`` (the published configs:
FLUX.1-dev at 1024x1024 bf16, Wan2.1-1.3B at 480x832x33 frames bf16, DiT-XL/2 at 256x256
with CFG batch 2; random weights).

Usage (from the repo root):
  python bench/compile.py                                  # tiny models on CPU
  python bench/compile.py --families flux --modes eager,full
  python bench/compile.py --device cuda --size full --out $OUT/compile.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
from _bench_common import DIT_XL_2, FLUX_DEV, WAN_1_3B, cpu_name

import tcpade
from tcpade import TCPadeConfig
from tcpade.tools import tiny

STEPS = 20


# ----------------------------------------------------------------------------------- models


def build(family: str, size: str, device: str, dtype):
    """(model, kwargs of one call with ``hidden_states`` the latents, timestep(s) -> tensor)."""
    from diffusers import DiTTransformer2DModel, FluxTransformer2DModel, WanTransformer3DModel

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    if family == "flux":
        if size == "tiny":
            cfg, side, txt = tiny.CONFIGS["flux"], 8, 8
        else:
            cfg, side, txt = FLUX_DEV, 64, 512  # 1024x1024: 8x VAE, 2x2 packing -> 64x64 tokens
        with torch.device(device):  # full size: initialise on the GPU (FLUX.1-dev is 12B parameters)
            model = FluxTransformer2DModel(**cfg)
        ids = torch.stack(
            torch.meshgrid(torch.zeros(1), torch.arange(side).float(), torch.arange(side).float(), indexing="ij"), -1
        ).reshape(side * side, 3)
        kw = dict(
            hidden_states=rnd(1, side * side, cfg["in_channels"]),
            encoder_hidden_states=rnd(1, txt, cfg["joint_attention_dim"]),
            pooled_projections=rnd(1, cfg["pooled_projection_dim"]),
            img_ids=ids.to(device),
            txt_ids=torch.zeros(txt, 3, device=device),
        )
        if cfg.get("guidance_embeds"):
            kw["guidance"] = torch.full((1,), 3.5, device=device)
        return model, kw, lambda s: torch.full((1,), s, device=device, dtype=dtype)
    if family == "wan":
        if size == "tiny":
            cfg, latent, txt = tiny.CONFIGS["wan"], (2, 8, 8), 8
        else:
            cfg, latent, txt = WAN_1_3B, (9, 60, 104), 512  # 480x832, 33 frames
        with torch.device(device):
            model = WanTransformer3DModel(**cfg)
        kw = dict(hidden_states=rnd(1, 16, *latent), encoder_hidden_states=rnd(1, txt, cfg["text_dim"]))
        return model, kw, lambda s: torch.full((1,), 1000.0 * s, device=device, dtype=dtype)
    if family == "dit":
        if size == "tiny":
            cfg = tiny.CONFIGS["dit"]
        else:
            cfg = DIT_XL_2
        with torch.device(device):
            model = DiTTransformer2DModel(**cfg)
        n = cfg["sample_size"]
        kw = dict(hidden_states=rnd(2, 4, n, n), class_labels=torch.tensor([1, 1000], device=device))  # CFG batch
        return model, kw, lambda s: torch.full((2,), int(999 * s), device=device, dtype=torch.long)
    raise ValueError(f"unknown family {family!r}")


def blocks(family, model):
    from tcpade.integrations import adapters

    return [b for _, b in adapters.find_adapter(model).stack(model)]


# ---------------------------------------------------------------------------------- running


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def loop(call, kw0, timestep, device, mark_step=False, rt=None):
    """The STEPS-step Euler loop; with tcpade's runtime ``rt`` the loop tells it each step's time
    (a host float), so no call reads its timestep tensor back from the device."""
    kw = dict(kw0)
    x = kw["hidden_states"].clone()
    c = x.shape[1] if x.dim() != 3 else x.shape[2]
    k = 0
    with rt.clocked(lambda: 1.0 - k / STEPS) if rt is not None else contextlib.nullcontext():
        for k in range(STEPS):
            if mark_step:
                torch.compiler.cudagraph_mark_step_begin()
            kw.update(hidden_states=x, timestep=timestep(1.0 - k / STEPS))
            out = call(**kw, return_dict=False)[0]
            x = x - (out[:, :c] if x.dim() != 3 else out[..., :c]) / STEPS
    return x


def run_one(args, family, mode, setting):
    device = args.device
    dtype = torch.float32 if args.size == "tiny" else torch.bfloat16
    model, kw, timestep = build(family, args.size, device, dtype)
    model = model.to(device, dtype).eval()
    torch._dynamo.reset()
    rt = None
    if setting != "off":
        rt = tcpade.apply(model, TCPadeConfig.slow(), num_steps=STEPS)
    call = model
    if mode == "full":
        call = torch.compile(model, fullgraph=True)
    elif mode == "cudagraphs":
        call = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    elif mode == "regional":
        if getattr(model, "_repeated_blocks", None):
            model.compile_repeated_blocks(fullgraph=True)
        else:
            for b in blocks(family, model):
                b.compile(fullgraph=True)
    mark = mode == "cudagraphs"
    sync(device)
    with tiny.CompileCount() as warm:
        t0 = time.perf_counter()
        loop(call, kw, timestep, device, mark, rt)
        sync(device)
        t_first = time.perf_counter() - t0
    times, cpu_times, reads, syncs = [], [], [], []
    with torch._dynamo.config.patch(error_on_recompile=True), tiny.CompileCount() as steady:
        for _ in range(args.reps):
            r0 = rt.host_reads if rt is not None else 0
            t0, c0 = time.perf_counter(), time.process_time()
            loop(call, kw, timestep, device, mark, rt)
            sync(device)
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
            reads.append((rt.host_reads - r0) if rt is not None else 0)
        if device == "cuda":  # one more loop, counting the synchronising calls torch reports
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    loop(call, kw, timestep, device, mark, rt)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                sync(device)
            syncs.append(sum("synchroniz" in str(w.message) for w in caught))
    loop_s = statistics.median(times)
    computed = len(tcpade.summary(model).computed("default")) if rt is not None else STEPS
    return dict(
        family=family, mode=mode, tcpade=setting, size=args.size, device=device,
        compile_s=max(0.0, t_first - loop_s) if mode != "eager" else 0.0,
        first_loop_s=t_first, step_ms=1e3 * loop_s / STEPS, loop_s=loop_s,
        step_cpu_ms=1e3 * statistics.median(cpu_times) / STEPS,
        frames_warmup=warm.frames, recompiles_warmup=len(warm.recompiles), graph_breaks=warm.graph_breaks,
        frames_steady=steady.frames, recompiles_steady=len(steady.recompiles),
        computed=computed, host_waits=statistics.median(reads), cuda_syncs=syncs[0] if syncs else None,
    )  # fmt: skip


def markdown(rows, args) -> str:
    head = (
        "| model | run | tcpade | compile s | ms/step (wall) | ms/step (process CPU) | computed | host waits/loop | "
        "frames (warm-up) | recompiles (warm-up / after) | graph breaks |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        waits = f"{r['host_waits']:.0f}" if r["tcpade"] != "off" else "-"
        if r["cuda_syncs"] is not None:
            waits += f" (cuda syncs {r['cuda_syncs']})"
        lines.append(
            f"| {r['family']} | {r['mode']} | {r['tcpade']} | {r['compile_s']:.1f} | {r['step_ms']:.2f} | "
            f"{r['step_cpu_ms']:.2f} | "
            f"{r['computed']}/{STEPS} | {waits} | {r['frames_warmup']} | "
            f"{r['recompiles_warmup']} / {r['recompiles_steady']} | {r['graph_breaks']} |"
        )
    return "\n".join(lines)


def machine(device) -> str:
    name = torch.cuda.get_device_name() if device == "cuda" else cpu_name()
    return (
        f"{name}; torch {torch.__version__}; threads {torch.get_num_threads()}; python {platform.python_version()}; "
        f"{datetime.date.today()}"
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--size", default=None, choices=["tiny", "full"], help="default: tiny on cpu, full on cuda")
    p.add_argument("--families", default="flux,wan,dit")
    p.add_argument("--modes", default=None, help="eager,full,regional (+cudagraphs on cuda)")
    p.add_argument("--settings", default="off,on")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads; 1: least noise)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    args.size = args.size or ("tiny" if args.device == "cpu" else "full")
    modes = (args.modes or ("eager,full,regional" + (",cudagraphs" if args.device == "cuda" else ""))).split(",")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    logging.getLogger("tcpade").setLevel(logging.ERROR)
    rows = []
    for family in args.families.split(","):
        for mode in modes:
            for setting in args.settings.split(","):
                row = run_one(args, family, mode, setting)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print()
    print(machine(args.device))
    print(markdown(rows, args))
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine(args.device), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
