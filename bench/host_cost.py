"""Host cost of a skipped step: what tcpade's hooks cost per transformer call, and what that
leaves of the ideal end-to-end speed-up.

Three parts (``--parts``, default ``calls,e2e``; ``profile`` on request):

* ``calls``: per-call host time of the transformer inside a ``FluxPipeline`` run on a SMALL
  FLUX (2 double + 6 single blocks like the mid-size model, width 16, 16 image tokens), where
  the compute is negligible and the Python/dispatch overhead dominates: tcpade off, tcpade
  on (``TCPadeConfig.fast()``) computing, tcpade on skipping. Each call is timed from a
  torch forward pre-hook put first to a forward hook put last on the transformer (so tcpade's
  own pre-/post-hooks, its diffusers hooks and the forward are inside; the same two timing
  hooks sit on the baseline's transformer). Two clocks: ``thread`` = CPU time of the calling
  thread (``time.thread_time_ns``; what the host spends, less inflated by other jobs on a
  shared machine; at this size intra-op threads add nothing) and ``wall`` (perf_counter).
  Modes: eager, ``torch.compile(transformer, fullgraph=True)`` ("full") and
  ``transformer.compile_repeated_blocks(fullgraph=True)`` ("regional"). Microseconds per
  call, median and min over the timed runs.
* ``e2e``: the reference end-to-end run (the 0.95-of-ideal target is set on it): a mid-size
  random FLUX (FluxTransformer2DModel,
  num_layers=2, num_single_layers=6, 4 heads x 64 = width 256, 256 image tokens (32x32
  latent, packed 2x2 -> 16x16), 32 text tokens), 20 steps, no CFG (guidance_embeds=False,
  true_cfg_scale 1: one transformer call per step), ``FluxPipeline`` with precomputed prompt
  embeddings, no text encoder, ``output_type="latent"``; baseline and ``TCPadeConfig.fast()``
  interleaved, min of ``--repeats``; eager and full compile. Prints ms (wall), process CPU
  ms, speed-up, pass ratio (20 / computed passes, ``tcpade.summary(pipe)``) and speed-up /
  pass ratio ("fraction of ideal").
* ``profile``: where a skipped and a computed call's host time goes, on the small model,
  eager: timers (thread CPU time) around tcpade's hook functions (inclusive, per call), and a
  cProfile of the tcpade calls (``--cprofile``).

tcpade is imported lazily (inside the functions), so ``PYTHONPATH=/path/to/other/checkout``
measures another version of the package (the layout before the subpackage split, commit
65a04f6, is handled too); the script prints ``tcpade.__file__``.

Usage (from the repo root):
  .venv/bin/python bench/host_cost.py                          # calls + e2e, 7 repeats
  .venv/bin/python bench/host_cost.py --parts profile --cprofile
  .venv/bin/python bench/host_cost.py --quick                  # smoke test: tiny sizes, 2 repeats
  PYTHONPATH=/tmp/old .venv/bin/python bench/host_cost.py      # another checkout ("before")
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import statistics
import sys
import time
import warnings

import torch

STEPS = 20


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ------------------------------------------------------------------------------ model + pipeline

SMALL = dict(num_layers=2, num_single_layers=6, attention_head_dim=16, num_attention_heads=1, joint_attention_dim=32,
             pooled_projection_dim=32, axes_dims_rope=(4, 4, 8), size=8, txt=8)  # fmt: skip
MID = dict(num_layers=2, num_single_layers=6, attention_head_dim=64, num_attention_heads=4, joint_attention_dim=256,
           pooled_projection_dim=256, axes_dims_rope=(8, 28, 28), size=32, txt=32)  # fmt: skip
QUICK_MID = dict(SMALL, num_layers=1, num_single_layers=2)  # --quick: the e2e part on tiny sizes


def build_pipeline(spec: dict, seed: int = 0):
    """(pipe, generate()) for a random FLUX of ``spec``; the same seed gives the same weights.
    The VAE is one level (scale factor 1), so a ``size`` x ``size`` image is a size x size latent
    of 4 channels, packed 2x2 into (size/2)^2 tokens of 16 channels."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    cfg = {k: v for k, v in spec.items() if k not in ("size", "txt")}
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, guidance_embeds=False, **cfg).eval()
    vae = AutoencoderKL(block_out_channels=(4,), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=1, sample_size=spec["size"])  # fmt: skip
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=model)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    pe = torch.randn(1, spec["txt"], spec["joint_attention_dim"], generator=g)
    pp = torch.randn(1, spec["pooled_projection_dim"], generator=g)
    size = spec["size"]

    def generate():
        return pipe(prompt_embeds=pe, pooled_prompt_embeds=pp, height=size, width=size, num_inference_steps=STEPS,
                    output_type="latent", generator=torch.Generator().manual_seed(0)).images  # fmt: skip

    return pipe, generate


def compile_pipe(pipe, mode: str) -> bool:
    """Compile ``pipe.transformer`` in place for ``mode`` (after tcpade.apply); False if unsupported."""
    if mode == "full":
        pipe.transformer = torch.compile(pipe.transformer, fullgraph=True)
    elif mode == "regional":
        if not hasattr(pipe.transformer, "compile_repeated_blocks"):
            return False
        pipe.transformer.compile_repeated_blocks(fullgraph=True)
    return True


def computed_passes(pipe) -> int:
    import tcpade

    s = tcpade.summary(pipe)
    return sum(len(s.computed(b)) for b in s.branches)


def skip_flags(pipe) -> list:
    """Per transformer call of the last run, in call order (one branch: no CFG): True = skipped."""
    import tcpade

    s = tcpade.summary(pipe)
    (recs,) = s.branches.values()
    return [not r.computed for r in recs]


# ------------------------------------------------------------------------------ per-call timer


class CallTimer:
    """Thread CPU and wall time of each transformer call, from a pre-hook put first to a forward
    hook put last (register it after tcpade.apply)."""

    def __init__(self, module):
        module = getattr(module, "_orig_mod", module)
        self.thread, self.wall = [], []
        self._t0 = self._w0 = 0

        @torch.compiler.disable
        def pre(mod, args, kwargs):
            self._w0 = time.perf_counter_ns()
            self._t0 = time.thread_time_ns()

        @torch.compiler.disable
        def post(mod, args, kwargs, out):
            t1 = time.thread_time_ns()
            w1 = time.perf_counter_ns()
            self.thread.append(t1 - self._t0)
            self.wall.append(w1 - self._w0)

        self.handles = [module.register_forward_pre_hook(pre, with_kwargs=True, prepend=True),
                        module.register_forward_hook(post, with_kwargs=True, always_call=True)]  # fmt: skip

    def take(self):
        out = list(zip(self.thread, self.wall))
        self.thread.clear()
        self.wall.clear()
        return out


def _stats(xs):
    xs = [x / 1000 for x in xs]
    return (statistics.median(xs), min(xs), len(xs)) if xs else (float("nan"), float("nan"), 0)


def part_calls(modes, repeats, log, spec=SMALL, threads=1):
    outer = torch.get_num_threads()
    torch.set_num_threads(threads)  # one intra-op thread: thread CPU time is then the host's work (no OpenMP spin)
    try:
        return _part_calls(modes, repeats, log, spec)
    finally:
        torch.set_num_threads(outer)


def _part_calls(modes, repeats, log, spec):
    import tcpade

    log(f"\n== per-call host time, small FLUX ({spec['num_layers']}+{spec['num_single_layers']} blocks, width "
        f"{spec['attention_head_dim'] * spec['num_attention_heads']}, {(spec['size'] // 2) ** 2} image tokens, "
        f"{STEPS} steps, FluxPipeline); us per transformer call, median / min over {repeats} runs x {STEPS} calls; "
        "thread = CPU time of the calling thread, wall = perf_counter; "
        f"torch threads {torch.get_num_threads()}")  # fmt: skip
    log(f"{'mode':9s} {'case':16s} {'n':>4s} {'thread med':>10s} {'thread min':>10s} {'wall med':>9s} {'wall min':>9s}")
    rows = {}
    for mode in modes:
        base, gen_b = build_pipeline(spec)
        on, gen_o = build_pipeline(spec)
        tcpade.apply(on, tcpade.TCPadeConfig.fast())
        ok = compile_pipe(base, mode) and compile_pipe(on, mode)
        if not ok:
            log(f"{mode:9s} (not supported by this diffusers)")
            continue
        tb, to = CallTimer(base.transformer), CallTimer(on.transformer)
        try:
            gen_b(), gen_o()  # warm-up (compiles)
            gen_b(), gen_o()
        except Exception as exc:  # noqa: BLE001 - report and go on with the next mode
            log(f"{mode:9s} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            continue
        tb.take(), to.take()
        off, comp, skip = [], [], []
        for _ in range(repeats):
            gen_b()
            off += tb.take()
            gen_o()
            flags = skip_flags(on)
            calls = to.take()
            assert len(calls) == len(flags), (len(calls), len(flags))
            for c, s in zip(calls, flags):
                (skip if s else comp).append(c)
        for case, xs in (("off", off), ("on, computing", comp), ("on, skipping", skip)):
            th, wa = _stats([x[0] for x in xs]), _stats([x[1] for x in xs])
            rows[(mode, case)] = (th, wa)
            log(f"{mode:9s} {case:16s} {th[2]:4d} {th[0]:10.1f} {th[1]:10.1f} {wa[0]:9.1f} {wa[1]:9.1f}")
        b_th, c_th, s_th = (rows[(mode, case)][0] for case in ("off", "on, computing", "on, skipping"))
        log(
            f"{mode:9s} tcpade adds (thread, median): computing {c_th[0] - b_th[0]:+.1f} us, "
            f"skipping {s_th[0] - b_th[0]:+.1f} us (a skipped call = {100 * s_th[0] / b_th[0]:.0f}% of a plain one)"
        )
        del base, on
    return rows


# ------------------------------------------------------------------------------ end to end


def part_e2e(modes, repeats, log, spec=MID):
    import tcpade

    log(f"\n== end to end: random FLUX {spec['num_layers']}+{spec['num_single_layers']} blocks, width "
        f"{spec['attention_head_dim'] * spec['num_attention_heads']}, {(spec['size'] // 2) ** 2} image tokens, "
        f"{spec['txt']} text tokens, {STEPS} steps, no CFG, FluxPipeline; baseline and TCPadeConfig.fast() "
        f"interleaved, min of {repeats} (wall ms; cpu = process CPU ms, all threads)")  # fmt: skip
    log(f"{'mode':9s} {'base ms':>8s} {'tcpade ms':>9s} {'base cpu':>9s} {'tcp cpu':>8s} {'speedup':>7s} "
        f"{'passes':>6s} {'ratio':>5s} {'of ideal':>8s} {'cpu sp.':>7s} {'cpu of ideal':>12s}")  # fmt: skip
    rows = {}
    for mode in modes:
        base, gen_b = build_pipeline(spec)
        on, gen_o = build_pipeline(spec)
        tcpade.apply(on, tcpade.TCPadeConfig.fast())
        if not (compile_pipe(base, mode) and compile_pipe(on, mode)):
            log(f"{mode:9s} (not supported)")
            continue
        try:
            gen_b(), gen_o()  # warm-up (compiles)
        except Exception as exc:  # noqa: BLE001
            log(f"{mode:9s} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            continue
        tb, to, cb, co = [], [], [], []
        for _ in range(repeats):
            for gen, wall, cpu in ((gen_b, tb, cb), (gen_o, to, co)):
                c0, w0 = time.process_time(), time.perf_counter()
                gen()
                wall.append(1e3 * (time.perf_counter() - w0))
                cpu.append(1e3 * (time.process_time() - c0))
        passes = computed_passes(on)
        ratio = STEPS / passes
        sp, csp = min(tb) / min(to), min(cb) / min(co)
        rows[mode] = dict(base=min(tb), tcpade=min(to), base_cpu=min(cb), tcpade_cpu=min(co), speedup=sp,
                          passes=passes, ratio=ratio, ideal=sp / ratio, cpu_speedup=csp)  # fmt: skip
        log(f"{mode:9s} {min(tb):8.1f} {min(to):9.1f} {min(cb):9.1f} {min(co):8.1f} {sp:6.2f}x {passes:3d}/{STEPS} "
            f"{ratio:5.2f} {sp / ratio:8.2f} {csp:6.2f}x {csp / ratio:12.2f}")  # fmt: skip
        log(
            f"{'':9s} medians: base {statistics.median(tb):.1f} ms, tcpade {statistics.median(to):.1f} ms; "
            f"implied cost of a skipped step (min, wall): "
            f"{100 * (min(to) - passes * min(tb) / STEPS) / ((STEPS - passes) * min(tb) / STEPS):.1f}% of a full step"
        )
        del base, on
    return rows


# ------------------------------------------------------------------------------ profile


def _tcpade_modules():
    """(adapters, api, runtime module, history module) of whichever layout is imported."""
    import importlib

    def first(*names):
        for n in names:
            try:
                return importlib.import_module(n)
            except ImportError:
                continue
        raise ImportError(names)

    return (first("tcpade.integrations.adapters", "tcpade.adapters"), first("tcpade.integrations.api", "tcpade.api"),
            first("tcpade.policy.runtime", "tcpade.policy"), first("tcpade.core.history", "tcpade.history"),
            first("tcpade.core.ops", "tcpade.ops"))  # fmt: skip


# (module index, class or None, attribute): the functions timed in the profile part
_PROBES = [
    (0, "_RootHook", "before"), (0, "_RootHook", "after"), (0, "_RootHook", "new_forward"),
    (0, None, "_call_frame"), (0, "_CallLock", "acquire"), (0, "_CallLock", "release"),
    (0, None, "_time_of"), (0, "_RootHook", "branch"), (0, "_RootHook", "forced"),
    (0, "_CallState", "clear"), (0, "_CallState", "start"),
    (0, "_BlockHook", "new_forward"), (0, "_BlockHook", "before_first"), (0, "_BlockHook", "after_block"),
    (0, None, "_prediction"),
    (1, "_Caller", "__call__"), (1, "_SchedulerClock", "__call__"), (1, "_Guard", "__call__"),
    (2, "Runtime", "decide"), (2, "Runtime", "finish"), (2, "Runtime", "step_time"), (2, "Runtime", "total_steps"),
    (2, "Runtime", "_coef"), (2, "Runtime", "_plan"), (2, "Runtime", "_branch"), (2, "_Call", "__call__"),
    (3, "History", "predict"), (3, "History", "record"), (3, "History", "advance"), (3, "History", "matches"),
    (3, "History", "coef_values"), (2, None, "coef_to_device"),
    (4, None, "predict"), (4, None, "update"), (4, None, "_check_predict"), (4, None, "_check_update"),
    (4, None, "_check_slot_values"),
]  # fmt: skip


class _Probe:
    def __init__(self, name):
        self.name, self.ns, self.n = name, 0, 0


def _install_probes(probes_out):
    mods = _tcpade_modules()
    undo = []
    for mi, cls_name, attr in _PROBES:
        owner = mods[mi] if cls_name is None else getattr(mods[mi], cls_name, None)
        if owner is None or attr not in vars(owner):
            continue
        fn = vars(owner)[attr]
        prefix = "ops." if mi == 4 else ""  # tcpade's custom ops (the dispatch included) and their checks
        name = f"{prefix}{cls_name + '.' if cls_name else ''}{attr}"
        p = probes_out.setdefault(name, _Probe(name))

        def make(fn, p):
            @functools.wraps(fn)
            def timed(*a, **k):
                t0 = time.thread_time_ns()
                try:
                    return fn(*a, **k)
                finally:
                    p.ns += time.thread_time_ns() - t0
                    p.n += 1

            return timed

        setattr(owner, attr, make(fn, p))  # module-level functions: looked up in their module's globals per call
        undo.append((owner, attr, fn))
    return undo


def part_profile(repeats, log, spec=SMALL, cprofile=False):
    """Timers around tcpade's functions on the small model, eager, TCPadeConfig.fast(): each
    function's inclusive thread CPU time within a transformer call, median over the runs'
    skipped calls and over their computed calls (the schedule is fixed: the first run says which
    call is which). ``cprofile``: also a cProfile (thread CPU time) of the skipped calls and of
    the computed calls alone."""
    import tcpade

    log(f"\n== profile: small FLUX, eager, TCPadeConfig.fast(), {repeats} runs x {STEPS} calls; per function: "
        "inclusive thread CPU us within one transformer call, median over the calls of that kind (timers cost "
        "~0.2-0.5 us each and inflate the functions that contain timed ones)")  # fmt: skip
    outer = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the calls part: no OpenMP spin in the thread CPU time
    probes = {}
    undo = _install_probes(probes)  # before apply: the hooks bind these functions at attach time
    try:
        on, gen = build_pipeline(spec)
        tcpade.apply(on, tcpade.TCPadeConfig.fast())
        gen()
        gen()
        flags = skip_flags(on)
        mod = getattr(on.transformer, "_orig_mod", on.transformer)
        st = dict(i=0, kind="", a=None, t0=0)
        deltas = {"skip": [], "compute": []}
        profs = {}

        def pre(m, a, k):
            st["kind"] = "skip" if flags[st["i"] % len(flags)] else "compute"
            st["a"] = {n: (p.ns, p.n) for n, p in probes.items()}
            st["t0"] = time.thread_time_ns()

        def post(m, a, k, o):
            t1 = time.thread_time_ns()
            before = st["a"]
            d = {n: (p.ns - before[n][0], p.n - before[n][1]) for n, p in probes.items()}
            d["(whole call)"] = (t1 - st["t0"], 1)
            deltas[st["kind"]].append(d)
            st["i"] += 1

        h1 = mod.register_forward_pre_hook(pre, with_kwargs=True, prepend=True)
        h2 = mod.register_forward_hook(post, with_kwargs=True, always_call=True)
        for _ in range(repeats):
            st["i"] = 0
            gen()
            assert skip_flags(on) == flags
        h1.remove()
        h2.remove()
    finally:
        torch.set_num_threads(outer)
        for owner, attr, fn in undo:
            setattr(owner, attr, fn)
    if cprofile:  # a second set of runs, on a fresh pipeline without the timers
        import cProfile

        torch.set_num_threads(1)
        try:
            profs = {k: cProfile.Profile(time.thread_time_ns, 1e-9) for k in deltas}
            on, gen = build_pipeline(spec)
            tcpade.apply(on, tcpade.TCPadeConfig.fast())
            gen()
            mod = getattr(on.transformer, "_orig_mod", on.transformer)
            pst = dict(i=0, kind="")

            def ppre(m, a, k):
                pst["kind"] = "skip" if flags[pst["i"] % len(flags)] else "compute"
                profs[pst["kind"]].enable()

            def ppost(m, a, k, o):
                profs[pst["kind"]].disable()
                pst["i"] += 1

            h1 = mod.register_forward_pre_hook(ppre, with_kwargs=True, prepend=True)
            h2 = mod.register_forward_hook(ppost, with_kwargs=True, always_call=True)
            for _ in range(repeats):
                pst["i"] = 0
                gen()
            h1.remove()
            h2.remove()
        finally:
            torch.set_num_threads(outer)

    def med(calls, name):
        return statistics.median(c[name][0] for c in calls) / 1000

    for kind, title in (("skip", "skipped"), ("compute", "computed")):
        calls = deltas[kind]
        tot = med(calls, "(whole call)")
        log(f"\n{title} calls: {len(calls)}; whole call (timer to timer) median {tot:.1f} us")
        log(f"  {'function':34s} {'us/call':>8s} {'share':>6s} {'calls/call':>10s}")
        names = [n for n in calls[0] if n != "(whole call)" and any(c[n][1] for c in calls)]
        meds = {n: med(calls, n) for n in names}
        for n in sorted(names, key=lambda n: -meds[n]):
            cnt = statistics.median(c[n][1] for c in calls)
            log(f"  {n:34s} {meds[n]:8.1f} {100 * meds[n] / tot:5.1f}% {cnt:10.1f}")

        # Derived: split the call into tcpade's pre-hook, the forward (the model's own layers outside
        # the block hooks, the block hooks, the first block's torch hooks), tcpade's post-hook, rest.
        def per_call(c, n):
            return c.get(n, (0, 0))[0]

        parts = {
            "pre-hook (_RootHook.before)": [per_call(c, "_RootHook.before") for c in calls],
            "post-hook (_RootHook.after)": [per_call(c, "_RootHook.after") for c in calls],
            "block hooks (8 x _BlockHook.new_forward)": [per_call(c, "_BlockHook.new_forward") for c in calls],
            "first block's torch hooks (before_first + after_block)": [
                per_call(c, "_BlockHook.before_first") + per_call(c, "_BlockHook.after_block") for c in calls],
            "model layers outside the blocks + dispatch": [
                per_call(c, "_RootHook.new_forward") - per_call(c, "_BlockHook.new_forward")
                - per_call(c, "_BlockHook.before_first") - per_call(c, "_BlockHook.after_block") for c in calls],
            "rest (torch _call_impl, hook dispatch, timers)": [
                per_call(c, "(whole call)") - per_call(c, "_RootHook.before") - per_call(c, "_RootHook.after")
                - per_call(c, "_RootHook.new_forward") for c in calls],
        }  # fmt: skip
        log("  split of the call (median of each part; they need not add up exactly):")
        for n, xs in parts.items():
            m = statistics.median(xs) / 1000
            log(f"    {n:56s} {m:8.1f} us {100 * m / tot:5.1f}%")
    for kind, pr in profs.items():
        import io
        import pstats

        for order in ("tottime", "cumulative"):
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats(order).print_stats(25)
            n = len(deltas[kind])  # the same schedule, the same number of runs
            log(
                f"\ncProfile of the {n} {kind} calls (thread CPU s over all of them; per call: divide by {n}), "
                f"{order} order, top 25:"
            )
            log("\n".join(line for line in s.getvalue().splitlines() if line.strip()))


# ------------------------------------------------------------------------------ main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats, eager only (smoke test)")
    ap.add_argument("--parts", default="calls,e2e", help="comma list of calls, e2e, profile")
    ap.add_argument("--modes", default=None, help="calls: eager,full,regional; e2e: eager,full (default: all)")
    ap.add_argument("--cprofile", action="store_true", help="profile part: also a cProfile listing")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the e2e part")
    ap.add_argument("--call-threads", type=int, default=1, help="torch threads of the calls and profile parts")
    ap.add_argument(
        "--call-size",
        choices=("small", "mid"),
        default="small",
        help="model of the calls part: small (host overhead dominates) or the e2e part's mid-size FLUX",
    )
    ap.add_argument("--out", default=None, help="also append the report to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    lines = []

    def log(msg=""):
        print(msg, flush=True)
        lines.append(msg)

    import diffusers

    import tcpade

    repeats = 2 if args.quick and args.repeats == 7 else args.repeats
    parts = args.parts.split(",")
    log(f"# bench/host_cost.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    log(f"# {datetime.datetime.now().isoformat(timespec='seconds')}  cpu: {cpu_name()} ({os.cpu_count()} cores "
        f"visible), torch {torch.__version__}, diffusers {diffusers.__version__}, python {platform.python_version()}, "
        f"torch threads {torch.get_num_threads()}, load avg {os.getloadavg()[0]:.2f}")  # fmt: skip
    log(f"# tcpade from {tcpade.__file__}")
    if "calls" in parts:
        modes = (args.modes or ("eager" if args.quick else "eager,full,regional")).split(",")
        part_calls(modes, repeats, log, spec=MID if args.call_size == "mid" else SMALL, threads=args.call_threads)
    if "e2e" in parts:
        modes = (args.modes or ("eager" if args.quick else "eager,full")).split(",")
        part_e2e([m for m in modes if m != "regional"] or ["eager"], repeats, log, QUICK_MID if args.quick else MID)
    if "profile" in parts:
        part_profile(repeats, log, cprofile=args.cprofile)
    log(f"# end {datetime.datetime.now().isoformat(timespec='seconds')}, load avg {os.getloadavg()[0]:.2f}")
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()
