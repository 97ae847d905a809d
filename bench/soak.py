"""Serving soak and fault campaign: one process, many calls, random requests, random faults.

    python bench/soak.py                      # 500 calls, 2 threads x 40 calls, 200 calls with faults
    python bench/soak.py --calls 40 --faults 20 --max-steps 16 --pool 0   # about the size tests/test_serving.py runs

Soak. A server holds one tiny FLUX pipeline (``tcpade.tools.tiny``, random weights, true CFG) per
preset (fast, slow, adaptive), tcpade applied once to each. Each call is a seeded random request:
step count 4..``--max-steps``, resolution, images per prompt, CFG on or off, preset, seed. Every
call's output and decisions are compared, bit for bit, with a fresh run of the same request (a
newly built pipeline, tcpade applied to it, called once). tcpade's own memory is measured after
call ``--warm`` and after the last call, each time right after the same probe request (the
history buffers follow the shape of the latest call): the Python heap allocated by tcpade's
files (tracemalloc), the history bytes (``Runtime.nbytes``), the step records and the hooks.

Threads. ``--pool`` threads, each with its own pipelines derived from the server's
(``from_pipe`` with a copy of the scheduler; the transformers shared), run ``--pool-calls``
random requests each at once; every call is compared with its fresh run.

Faults. ``--faults`` calls, each with one seeded random fault: an exception or a
KeyboardInterrupt raised from the scheduler's step or from a transformer block at a random call
of the run, a NaN written into a random block's image output at a random call, a request whose
prompt embeddings have another dtype than the model, a request whose latents are on another
device (``meta``). The faulted call's outcome is recorded; the next call (a random request)
must equal its fresh run bit for bit; a NaN under a fixed schedule must leave the decisions
those of the plan and be reported at its step.
"""

from __future__ import annotations

import argparse
import collections
import gc
import os
import random
import time
import tracemalloc
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

import tcpade
from tcpade import TCPadeConfig
from tcpade.tools.tiny import flux_embeds, flux_pipeline

PRESETS = {"fast": TCPadeConfig.fast, "slow": TCPadeConfig.slow, "adaptive": TCPadeConfig.adaptive}
SIZES = (16, 24, 32)
TCPADE_DIR = os.path.dirname(os.path.abspath(tcpade.__file__))


@dataclass(frozen=True)
class Request:
    steps: int
    size: int
    images: int
    cfg: bool
    preset: str
    seed: int

    @property
    def kind(self) -> str:
        return f"{self.preset} {'cfg' if self.cfg else 'no-cfg'}"


def draw(rng: random.Random, max_steps: int = 50) -> Request:
    return Request(steps=rng.randint(4, max_steps), size=rng.choice(SIZES), images=rng.choice((1, 2)),
                   cfg=rng.random() < 0.7, preset=rng.choice(sorted(PRESETS)), seed=rng.randrange(2**31))  # fmt: skip


EMBEDS = flux_embeds()  # the prompt embeddings of flux_pipeline


def new_pipeline(preset: Optional[str]):
    """A tiny FLUX pipeline (the same weights every time), tcpade applied when ``preset`` is given."""
    pipe, _ = flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    if preset is not None:
        tcpade.apply(pipe, PRESETS[preset]())
    return pipe


@torch.no_grad()
def run(pipe, req: Request, *, dtype=None, latents_device=None, **extra) -> torch.Tensor:
    pe, pp, ne, npp = EMBEDS
    if dtype is not None:
        pe, pp, ne, npp = (x.to(dtype) for x in (pe, pp, ne, npp))
    kw = dict(negative_prompt_embeds=ne, negative_pooled_prompt_embeds=npp, true_cfg_scale=2.0) if req.cfg else {}
    if latents_device is not None:
        n = (req.size // 2) ** 2  # packed 2x2 latent patches of a size x size image (VAE scale factor 1)
        kw["latents"] = torch.zeros(req.images, n, 16, device=latents_device)
    return pipe(prompt_embeds=pe, pooled_prompt_embeds=pp, num_images_per_prompt=req.images, height=req.size,
                width=req.size, num_inference_steps=req.steps, output_type="latent",
                generator=torch.Generator().manual_seed(req.seed), **kw, **extra).images  # fmt: skip


def decisions(pipe) -> Dict[str, List[Tuple[int, bool, str, bool]]]:
    s = tcpade.summary(pipe)
    return {br: [(r.k, r.computed, r.reason, r.nonfinite) for r in recs] for br, recs in s.branches.items()}


def fresh(req: Request):
    """The request's output and decisions on a newly built pipeline with tcpade newly applied."""
    pipe = new_pipeline(req.preset)
    out = run(pipe, req)
    dec = decisions(pipe)
    tcpade.remove(pipe)
    return out, dec


def same(out, dec, ref) -> bool:
    ref_out, ref_dec = ref
    # The decisions of the branches this request ran (a CFG-off call leaves "uncond" from before).
    return torch.equal(out, ref_out) and all(dec.get(br) == recs for br, recs in ref_dec.items())


class Server:
    """One pipeline per preset, tcpade applied once to each; a request goes to its preset's."""

    def __init__(self):
        self.pipes = {name: new_pipeline(name) for name in sorted(PRESETS)}

    def __call__(self, req: Request, **kw):
        pipe = self.pipes[req.preset]
        out = run(pipe, req, **kw)
        return out, decisions(pipe)

    def memory(self) -> Dict[str, int]:
        """tcpade's own memory: Python heap of tcpade's files (tracemalloc, when tracing), history
        bytes, step records, hooks on the transformers."""
        gc.collect()
        heap = -1
        if tracemalloc.is_tracing():
            snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, os.path.join(TCPADE_DIR, "*"))])
            heap = sum(stat.size for stat in snap.statistics("filename"))
        rts = [tcpade.runtime(p) for p in self.pipes.values()]
        hooks = 0
        for p in self.pipes.values():
            for m in p.transformer.modules():
                hooks += len(m._forward_hooks) + len(m._forward_pre_hooks)
                reg = getattr(m, "_diffusers_hook", None)
                hooks += len(reg.hooks) if reg is not None else 0
        return dict(heap=heap, history=sum(rt.nbytes for rt in rts),
                    records=sum(len(b.records) for rt in rts for b in rt.branches.values()), hooks=hooks,
                    branches=sum(len(rt.branches) for rt in rts))  # fmt: skip


PROBES = [Request(steps=20, size=32, images=2, cfg=True, preset=name, seed=7) for name in sorted(PRESETS)]


def soak(calls: int = 500, warm: int = 50, max_steps: int = 50, seed: int = 0, trace: bool = True, log=print):
    """The soak; returns a dict of the figures (mismatches: the calls that differed from their
    fresh run)."""
    rng = random.Random(seed)
    server = Server()
    if trace:
        tracemalloc.start(1)
    kinds: collections.Counter = collections.Counter()
    mismatches: List[int] = []
    mem, snaps = {}, {}
    t0 = time.perf_counter()
    for i in range(1, calls + 1):
        req = draw(rng, max_steps)
        kinds[req.kind] += 1
        out, dec = server(req)
        if not same(out, dec, fresh(req)):
            mismatches.append(i)
            log(f"call {i}: {req} differs from its fresh run")
        if i in (warm, calls // 2, calls):
            for probe in PROBES:
                server(probe)
            mem[i] = server.memory()
            if trace:
                snaps[i] = tracemalloc.take_snapshot()
    wall = time.perf_counter() - t0
    if trace:
        tracemalloc.stop()
    grown = []
    if trace and len(snaps) >= 2:  # where tcpade's heap grew between the first and the last measurement
        only = [tracemalloc.Filter(True, os.path.join(TCPADE_DIR, "*"))]
        a, b = (snaps[k].filter_traces(only) for k in (min(snaps), max(snaps)))
        grown = [str(d) for d in b.compare_to(a, "lineno") if d.size_diff > 0][:10]
    return dict(calls=calls, kinds=dict(sorted(kinds.items())), memory=mem, mismatches=mismatches, wall_s=wall,
                steps=(4, max_steps), grown=grown)  # fmt: skip


def threaded(threads: int = 2, calls: int = 40, max_steps: int = 50, seed: int = 2, log=print):
    """``threads`` threads, each with its own pipelines derived from the server's (``from_pipe``,
    own scheduler; the transformers shared), ``calls`` random requests each, all at once; every
    output and decisions compared with the request's fresh run (made first, in this thread).
    Returns mismatches, the wall time threaded and the same requests run one after another."""
    import copy
    import threading

    rng = random.Random(seed)
    server = Server()
    reqs = [[draw(rng, max_steps) for _ in range(calls)] for _ in range(threads)]
    refs = [[fresh(r) for r in rs] for rs in reqs]

    def derived():
        return {n: type(p).from_pipe(p, scheduler=copy.deepcopy(p.scheduler)) for n, p in server.pipes.items()}

    pipes = [derived() for _ in range(threads)]
    for ps in pipes:
        for p in ps.values():
            p.set_progress_bar_config(disable=True)
    bad: List[Tuple[int, int]] = []

    def job(i):
        for j, (req, ref) in enumerate(zip(reqs[i], refs[i])):
            p = pipes[i][req.preset]
            if not same(run(p, req), decisions(p), ref):
                bad.append((i, j))

    t0 = time.perf_counter()
    ts = [threading.Thread(target=job, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall_threads = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(threads):
        for req in reqs[i]:
            run(pipes[i][req.preset], req)
    wall_seq = time.perf_counter() - t0
    for i, j in bad:
        log(f"thread {i} call {j}: {reqs[i][j]} differs from its fresh run")
    return dict(threads=threads, calls=calls, mismatches=bad, wall_threads_s=wall_threads, wall_seq_s=wall_seq)


# ------------------------------------------------------------------------------------------ faults
class Injected(Exception):
    pass


class _AtCall:
    """Counts calls; ``hit()`` is True at the n-th (0-based)."""

    def __init__(self, at: int):
        self.n, self.at = 0, at

    def hit(self) -> bool:
        n, self.n = self.n, self.n + 1
        return n == self.at


def _raise(kind):
    if kind == "KeyboardInterrupt":
        raise KeyboardInterrupt("injected")
    raise Injected("injected fault")


def _inject_scheduler(pipe, at: int, kind: str):
    sched, counter = pipe.scheduler, _AtCall(at)
    original = sched.step

    def step(*args, **kwargs):
        if counter.hit():
            _raise(kind)
        return original(*args, **kwargs)

    sched.step = step
    return lambda: delattr(sched, "step")


def _inject_block_raise(block, at: int, kind: str):
    """Raise from the block's ``at``-th call (a torch pre-hook: skipped calls count too)."""
    counter = _AtCall(at)

    def pre(module, args):
        if counter.hit():
            _raise(kind)

    return block.register_forward_pre_hook(pre).remove


def _inject_block_nan(block, at: int):
    """A NaN in the image output of the block's ``at``-th computed forward: written by a forward
    hook on the block's last layer on the image tokens (FLUX double block: ``ff``; single block:
    ``proj_out``, whose last token is an image token), so tcpade's block hook sees it as the
    block's own output."""
    counter = _AtCall(at)
    layer = block.ff if hasattr(block, "ff") else block.proj_out

    def post(module, args, output):
        if counter.hit():
            output = output.clone()
            output.view(-1)[-1] = float("nan")
            return output
        return output

    handle = layer.register_forward_hook(post)
    handle.counter = counter
    return handle.remove, counter


FAULTS = ("exception in scheduler.step", "KeyboardInterrupt in scheduler.step", "exception in a block",
          "KeyboardInterrupt in a block", "NaN in a block's output", "prompt embeddings in bfloat16",
          "latents on another device (meta)")  # fmt: skip


def fault_campaign(calls: int = 200, max_steps: int = 20, seed: int = 1, log=print):
    """``calls`` faulted calls, each followed by a clean random call compared with its fresh run.
    Returns rows keyed by fault: n, outcomes (what the faulted call reported), next_identical,
    and for NaN faults nan_reported / plan_kept / finite."""
    rng = random.Random(seed)
    server = Server()
    rows = {f: dict(n=0, outcomes=collections.Counter(), next_identical=0, nan_reported=0, plan_kept=0, finite=0,
                    fixed=0, fired=0) for f in FAULTS}  # fmt: skip
    t0 = time.perf_counter()
    for i in range(calls):
        fault = rng.choice(FAULTS)
        req = draw(rng, max_steps)
        pipe = server.pipes[req.preset]
        branches = 2 if req.cfg else 1
        row = rows[fault]
        row["n"] += 1
        undo, kw, nan_at = (lambda: None), {}, None
        blocks = list(pipe.transformer.transformer_blocks) + list(pipe.transformer.single_transformer_blocks)
        if "scheduler" in fault:
            undo = _inject_scheduler(pipe, rng.randrange(req.steps), fault.split()[0])
        elif fault == "NaN in a block's output":  # among the first third of its calls: most compute
            undo, nan_at = _inject_block_nan(rng.choice(blocks), rng.randrange(max(1, req.steps * branches // 3)))
        elif "block" in fault:
            undo = _inject_block_raise(rng.choice(blocks), rng.randrange(req.steps * branches), fault.split()[0])
        elif "bfloat16" in fault:
            kw = dict(dtype=torch.bfloat16)
        else:
            kw = dict(latents_device="meta")
        out = None
        try:
            out, _ = server(req, **kw)
            outcome = "completed"
        except Injected:
            outcome = "raised the injected exception"
        except KeyboardInterrupt:
            outcome = "raised KeyboardInterrupt"
        except Exception as exc:  # what the model or diffusers says about a bad request
            outcome = f"raised {type(exc).__name__}"
        finally:
            undo()
        row["outcomes"][outcome] += 1
        if nan_at is not None and out is not None and nan_at.n > nan_at.at:  # the NaN was written
            row["fired"] += 1
            row["finite"] += bool(torch.isfinite(out).all())
            s = tcpade.summary(pipe)
            row["nan_reported"] += any(s.nonfinite(b) for b in s.branches) and "non-finite values at steps" in str(s)
            plan = tcpade.runtime(pipe).resolved.plan(req.steps)  # (the runtime's: calibrated schedules included)
            if plan is not None:
                row["fixed"] += 1
                row["plan_kept"] += all([r.k for r in recs if r.computed] == list(plan) for recs in s.branches.values()
                                        if len(recs) == req.steps)  # fmt: skip
        nxt = draw(rng, max_steps)
        got = server(nxt)
        if same(*got, fresh(nxt)):
            row["next_identical"] += 1
        else:
            log(f"fault {i} ({fault}, {req}): the next call {nxt} differs from its fresh run")
    return rows, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--warm", type=int, default=50, help="the call after which memory is first measured")
    ap.add_argument("--max-steps", type=int, default=50)
    ap.add_argument("--faults", type=int, default=200)
    ap.add_argument("--pool", type=int, default=2, help="threads of the threaded run (0: none)")
    ap.add_argument("--pool-calls", type=int, default=40, help="requests per thread in the threaded run")
    ap.add_argument("--fault-max-steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"soak: {args.calls} calls, steps 4-{args.max_steps}, sizes {SIZES}, 1-2 images, CFG on/off, presets "
          f"{sorted(PRESETS)}; torch {torch.__version__}, {args.threads} thread(s)")  # fmt: skip
    if args.calls:
        r = soak(args.calls, args.warm, args.max_steps, args.seed)
        print("requests by kind: " + ", ".join(f"{k} {n}" for k, n in r["kinds"].items()))
        print("memory after the probe request | tcpade Python heap B | history B | step records | hooks | branches")
        for i, m in r["memory"].items():
            print(f"  after call {i:4d}               | {m['heap']:20d} | {m['history']:9d} | {m['records']:12d} | "
                  f"{m['hooks']:5d} | {m['branches']:8d}")  # fmt: skip
        for line in r["grown"]:
            print(f"  grew: {line}")
        print(f"mismatches with a fresh run: {len(r['mismatches'])} of {r['calls']} {r['mismatches'] or ''}")
        print(f"wall time: {r['wall_s']:.1f} s (each call and its fresh run)")
    if args.pool:
        r = threaded(args.pool, args.pool_calls, args.max_steps, args.seed + 2)
        print(f"\nthreads: {r['threads']} threads x {r['calls']} random requests, each thread its own from_pipe "
              f"pipelines (transformers shared): mismatches with a fresh run: {len(r['mismatches'])} of "
              f"{r['threads'] * r['calls']}; wall {r['wall_threads_s']:.1f} s threaded, {r['wall_seq_s']:.1f} s "
              "the same requests one after another")  # fmt: skip
    if args.faults:
        rows, wall = fault_campaign(args.faults, args.fault_max_steps, args.seed + 1)
        print(f"\nfaults: {args.faults} faulted calls, steps 4-{args.fault_max_steps}, each followed by a random "
              f"clean call compared with its fresh run ({wall:.1f} s)")  # fmt: skip
        print("| fault | calls | what the faulted call reported | next call identical | NaN faults |")  # fmt: skip
        print("|---|---|---|---|---|")
        for fault, row in rows.items():
            said = "; ".join(f"{o}: {n}" for o, n in row["outcomes"].most_common())
            nan = (f"written in {row['fired']}: reported {row['nan_reported']}, plan kept {row['plan_kept']}/"
                   f"{row['fixed']} fixed, output finite {row['finite']}"
                   if fault.startswith("NaN") else "")  # fmt: skip
            print(f"| {fault} | {row['n']} | {said} | {row['next_identical']}/{row['n']} | {nan} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
