"""``tcpade bench``: full computation against tcpade's presets, or your configs, on your own model.

    tcpade bench ./my-flux --prompt "a red fox in the snow" --steps 20 --seeds 0,1
    tcpade bench ./my-dit --labels 207,360 --steps 25
    tcpade bench flux-digits --labels 3,7 --config warmup=1,interval=3,max_skips=2,final_steps=0

TARGET is a local diffusers pipeline folder (``DiffusionPipeline.from_pretrained(TARGET)``
with local files only: nothing is downloaded; e.g. a folder written by ``save_pretrained``)
or the name of a zoo model shipped with tcpade. Every method runs every (prompt or class
label, seed) pair from the same seeds: full computation first, then each preset or
``--config``. Printed per method: block-stack passes per call, the fewer-passes ratio, the
wall-clock speedup measured in this run (best of ``--repeats``, interleaved), and PSNR / SSIM
against full computation. Written into ``--out``: ``grid.png`` (a row per method, a column
per sample), ``quality_speed.png`` (PSNR against speedup) and ``results.csv``.

A config is ``key=value,...`` (TCPadeConfig fields), optionally after a preset:
``fast:interval=3`` or just ``paper``. Needs the ``demo`` extra (``pip install 'tcpade[demo]'``).
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from dataclasses import dataclass, field
from typing import List

from ..integrations.progress import Progress
from .args import UsageError, at_least, int_list, require, writable_folder, zoo_names
from .args import seeds as parse_seeds
from .runner import PipelineRunner, ZooRunner, check_class_labels, conditioning, load_pipeline

PRESETS = ("adaptive", "slow", "fast", "paper")

# UsageError (tcpade.tools.args's, a ValueError): a bad target, prompt or label for ``tcpade bench``,
# shown as one line naming the flag, exit status 2, no traceback.


def _value(text: str):
    low = text.strip().lower()
    if low == "none":
        return None
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def parse_config(spec: str):
    """``"[preset:]key=value,..."`` or ``"preset"`` -> TCPadeConfig (its own errors name the field)."""
    from ..policy.config import TCPadeConfig

    spec = spec.strip()
    preset, _, rest = spec.rpartition(":") if ":" in spec else ("", "", spec)
    if "=" not in rest and not preset:
        preset, rest = rest, ""
    kw = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, val = part.partition("=")
        if not eq:
            raise ValueError(f"config {spec!r}: {part!r} is not key=value")
        kw[key.strip()] = _value(val)
    fields = set(TCPadeConfig.__dataclass_fields__)
    unknown = sorted(set(kw) - fields)
    if unknown:
        raise ValueError(f"config {spec!r}: unknown TCPadeConfig field(s) {unknown}; fields: {sorted(fields)}")
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"config {spec!r}: unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
        return getattr(TCPadeConfig, preset)(**kw)
    return TCPadeConfig(**kw)


@dataclass
class Result:
    name: str
    images: object  # (N, C, H, W) or (N, C, F, H, W) in [-1, 1]
    passes: List[int] = field(default_factory=list)  # block-stack passes per call
    steps: List[int] = field(default_factory=list)  # transformer calls per branch, per call
    seconds: float = float("inf")
    summary: object = None  # tcpade's summary of the last call (None: full computation)


def zoo_target(name, labels, seeds, steps):
    """A zoo model's runner (one batched ``ZooModel.sample`` per method) for every (label, seed)
    pair, with ``title``, ``items`` and ``captions`` set."""
    from .. import zoo

    nc = zoo.SPECS[name].num_classes
    try:
        labels = [int(x) for x in labels] if labels else list(range(nc))
    except ValueError:
        raise UsageError(f"--labels: zoo model {name} takes class numbers, got {','.join(labels)}") from None
    bad = [x for x in labels if not 0 <= x < nc]
    if bad:
        raise UsageError(f"--labels: {name} has classes 0..{nc - 1}, got {bad}")
    items = [(lab, s) for lab in labels for s in seeds]
    tgt = ZooRunner(zoo.load(name), [s for _, s in items], [lab for lab, _ in items], steps)
    tgt.title = f"zoo model {name} ({type(tgt.model.transformer).__name__})"
    tgt.items, tgt.captions = items, [f"{lab}/s{s}" for lab, s in items]
    return tgt


def _to_images(x):
    """A pipeline's ``output_type="np"`` output (NHWC images or NFHWC clips in [0, 1]) -> NCHW /
    NCFHW in [-1, 1]."""
    import torch

    x = torch.as_tensor(x if not isinstance(x, list) else x[0]).float()
    if x.ndim == 3:
        x = x[None]
    x = x.movedim(-1, 1) if x.ndim == 4 else x.permute(0, 4, 1, 2, 3)
    return x * 2 - 1


def pipeline_target(path, prompts, labels, seeds, device, dtype, call_kwargs, steps):
    """A local diffusers pipeline's runner (one call per (prompt or label, seed)), with ``title``,
    ``items`` and ``captions`` set."""
    import inspect

    pipe = load_pipeline(path, "TARGET", dtype=dtype, device=device)
    name = type(pipe).__name__
    kind = conditioning(pipe)
    if kind == "labels":
        if prompts:
            raise UsageError(f"{name} takes class labels, not prompts: use --labels")
        labels = labels or ["0"]
        ids = [int(x) if x.lstrip("-").isdigit() else x for x in labels]
        if any(isinstance(x, str) for x in ids):
            known = getattr(pipe, "labels", None) or {}  # names through the pipeline's id2label
            unknown = [x for x in labels if x not in known]
            if unknown:
                raise UsageError(f"--labels: {unknown} are not class numbers nor class names of {name} "
                                 f"({len(known)} names)")  # fmt: skip
            ids = pipe.get_label_ids(labels)
        check_class_labels(pipe, ids)
        conds, names = [{"class_labels": [i]} for i in ids], [str(x) for x in labels]
    elif kind == "prompt":
        if labels:
            raise UsageError(f"{name} takes prompts, not class labels: use --prompt")
        prompts = prompts or ["a photograph of a red fox in the snow"]
        conds, names = [{"prompt": p} for p in prompts], [p[:12] for p in prompts]
    else:
        raise UsageError(f"{name}.__call__ takes neither prompt nor class_labels")
    params = inspect.signature(pipe.__call__).parameters
    extra = {k: v for k, v in call_kwargs.items() if v is not None and k in params}
    inputs = [dict(c, seed=s, output_type="np", **extra) for c in conds for s in seeds]
    tgt = PipelineRunner(pipe, inputs, steps, _to_images)
    tgt.title = f"pipeline {path} ({name}, {type(pipe.transformer).__name__})"
    tgt.items = [(c, s) for c in conds for s in seeds]
    tgt.captions = [f"{n}/s{s}" for n in names for s in seeds]
    return tgt


def measure(tgt, methods, repeats, bar):
    """Every (name, config) of ``methods`` on runner ``tgt`` ``repeats`` times, interleaved (every
    method sees the same machine load), after a warm-up run (first-call costs stay out of the
    timings); ``bar`` steps once per run. Returns {name: Result} with the best time of each."""
    tgt.run(None)
    bar.step("warm-up")
    results = {}
    for _ in range(repeats):
        for name, cfg in methods:
            t0 = time.perf_counter()
            run = tgt.run(cfg)
            dt = time.perf_counter() - t0
            res = results.setdefault(name, Result(name, run.outputs, run.passes, run.steps,
                                                  summary=run.summaries[-1]))  # fmt: skip
            res.seconds = min(res.seconds, dt)
            bar.step(name)
    bar.close()
    return results


def quality(r, ref):
    """PSNR and SSIM of Result ``r`` against the full computation ``ref`` (inf and 1 for ref itself;
    SSIM nan for images smaller than its 7x7 window)."""
    from . import metrics

    if r is ref:
        return float("inf"), 1.0
    psnr = float(metrics.psnr(r.images, ref.images).mean())
    try:
        ssim = float(metrics.ssim(r.images, ref.images).mean())
    except ValueError:  # images smaller than SSIM's 7x7 window
        ssim = float("nan")
    return psnr, ssim


def _grid(rows, captions, names, path):
    """rows: per method a batch (N, C, H, W) or clips (N, C, F, H, W; middle frame) in [-1, 1]."""
    from PIL import Image, ImageDraw

    first = rows[0]
    h, w = first.shape[-2:]
    scale = max(1, 96 // max(h, w))
    pad, label_w, top = 2, 90, 14
    n = first.shape[0]
    cell_h, cell_w = h * scale + pad, w * scale + pad
    canvas = Image.new("RGB", (label_w + n * cell_w, top + len(rows) * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, cap in enumerate(captions):
        draw.text((label_w + i * cell_w, 1), cap[: max(4, cell_w // 6)], fill=(0, 0, 0))
    for r, (batch, name) in enumerate(zip(rows, names)):
        if batch.ndim == 5:
            batch = batch[:, :, batch.shape[2] // 2]
        y0 = top + r * cell_h
        draw.text((4, y0 + cell_h // 2 - 5), name[:14], fill=(0, 0, 0))
        x = ((batch.clamp(-1, 1) + 1) * 127.5).round().byte()
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]
        arr = x.permute(0, 2, 3, 1).cpu().numpy()
        for i in range(n):
            tile = Image.fromarray(arr[i]).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (label_w + i * cell_w, y0))
    canvas.save(path)


def _plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    axis_labels = ((axes[0], "wall", "wall-clock speedup (x)"), (axes[1], "fewer", "fewer block-stack passes (x)"))
    for ax, key, label in axis_labels:
        for row in rows[1:]:
            ax.scatter([row[key]], [row["psnr"]], s=40)
            ax.annotate(row["method"], (row[key], row["psnr"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.axvline(1.0, color="0.7", lw=1)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("PSNR against full computation (dB)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(target, *, prompts=(), labels=(), seeds=(0,), steps=20, configs=None, out="tcpade-bench", repeats=1,
        device="cpu", dtype="float32", call_kwargs=None, threads=None, progress=None):  # fmt: skip
    """Run the benchmark; returns the table rows (dicts) it printed."""
    import torch

    from .. import zoo

    if threads:
        torch.set_num_threads(threads)
    if configs is None:
        configs = [(p, parse_config(p)) for p in PRESETS[:3]]
    if os.path.isdir(target):
        tgt = pipeline_target(target, list(prompts), list(labels), list(seeds), device, getattr(torch, dtype),
                              call_kwargs or {}, steps)  # fmt: skip
    elif target in zoo.names():
        if prompts:
            raise UsageError(f"zoo model {target} takes class labels, not prompts: use --labels")
        tgt = zoo_target(target, list(labels), list(seeds), steps)
    else:
        raise UsageError(f"{target!r} is neither a pipeline folder nor a zoo model ({', '.join(zoo.names())})")
    methods = [("full", None), *configs]
    bar = Progress(1 + repeats * len(methods), "tcpade bench", enabled=progress)
    results = measure(tgt, methods, repeats, bar)

    ref = results["full"]
    rows = []
    ncalls = len(tgt.items) if isinstance(tgt, PipelineRunner) else 1
    print(f"tcpade bench: {tgt.title}; {len(tgt.items)} sample(s), {steps} steps, best of {repeats}, "
          f"{device} {dtype}, {torch.get_num_threads()} thread(s)")  # fmt: skip
    print(f"{'method':22s} {'passes':>8s} {'fewer passes':>13s} {'wall speedup':>13s} {'PSNR dB':>8s} {'SSIM':>7s}")
    for name, _ in methods:
        r = results[name]
        total = max(r.steps) if r.steps else steps
        passes = sum(r.passes) / len(r.passes) if r.passes else total
        psnr, ssim = quality(r, ref)
        row = dict(method=name, passes=passes, steps=total, fewer=total / passes, wall=ref.seconds / r.seconds,
                   psnr=psnr, ssim=ssim, seconds=r.seconds / ncalls)  # fmt: skip
        rows.append(row)
        p_txt = f"{passes:g}/{total}"
        print(f"{name[:22]:22s} {p_txt:>8s} {row['fewer']:>12.2f}x {row['wall']:>12.2f}x "
              f"{psnr:>8.2f} {ssim:>7.4f}")  # fmt: skip
    os.makedirs(out, exist_ok=True)
    grid, plot, table = (os.path.join(out, f) for f in ("grid.png", "quality_speed.png", "results.csv"))
    _grid([results[n].images for n, _ in methods], tgt.captions, [n for n, _ in methods], grid)
    _plot(rows, plot, f"tcpade bench: {tgt.title}, {steps} steps")
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"\nwrote {grid} (rows: {', '.join(n for n, _ in methods)}), {plot} and {table}")
    return rows


def _list(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_cli(subparsers):
    p = subparsers.add_parser("bench",
                              help="full computation vs presets/configs on your diffusers pipeline or a zoo model",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("target", metavar="TARGET",
                   help=f"a local diffusers pipeline folder, or a zoo model: {', '.join(zoo_names())}")  # fmt: skip
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several; prompt pipelines)")
    p.add_argument("--labels", type=_list, default=[],
                   help="class labels, comma-separated (class-conditional pipelines: numbers or names; zoo: numbers; "
                   "default: every class of a zoo model, 0 for a pipeline)")  # fmt: skip
    p.add_argument("--seeds", default="0", help="seeds, comma-separated integers in [0, 2**64 - 1] (default 0)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps, >= 2 (default 20)")
    p.add_argument("--presets", type=_list, default=None,
                   help="presets to run, comma-separated (default adaptive,slow,fast; "
                   f"all: {','.join(PRESETS)})")  # fmt: skip
    p.add_argument("--config", action="append", default=[], metavar="[PRESET:]KEY=VALUE,...",
                   help="a TCPadeConfig to run (repeat for several); given alone, it replaces the presets")  # fmt: skip
    p.add_argument("--out", default="tcpade-bench", help="folder for grid.png, quality_speed.png, results.csv")
    p.add_argument("--repeats", type=int, default=1, help="timing repeats, >= 1 (best of; default 1)")
    p.add_argument("--device", default=None,
                   help="pipelines: a torch device (default: cuda if available, else cpu); "
                   "zoo models run on the cpu")  # fmt: skip
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="pipelines: the weights' dtype (default float32); zoo models run in float32")  # fmt: skip
    p.add_argument("--height", type=int, default=None, help="pipelines: image height in pixels")
    p.add_argument("--width", type=int, default=None, help="pipelines: image width in pixels")
    p.add_argument("--num-frames", type=int, default=None, help="video pipelines: frames")
    p.add_argument("--guidance-scale", type=float, default=None, help="pipelines: the guidance scale")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads, >= 1 (default: torch's)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stdout (default: when stdout is a terminal)")  # fmt: skip
    p.set_defaults(_parser=p)
    return p


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"--device: {' '.join(str(exc).split())}") from None
    backend = getattr(torch, dev.type, None) if dev.type != "cpu" else None
    if dev.type != "cpu" and not (backend is not None and hasattr(backend, "is_available") and backend.is_available()):
        raise UsageError(f"--device {device}: {dev.type} is not available here")


def run_cli(args) -> int:
    """Run ``tcpade bench`` from parsed arguments; a bad value raises UsageError (one line, exit 2)."""
    import math

    # the checks that need no model, and no torch, first
    if args.steps < 2:
        raise UsageError(f"--steps must be >= 2, got {args.steps}")
    at_least(args.repeats, 1, "--repeats")
    at_least(args.threads, 1, "--threads")
    for flag, value in (("--height", args.height), ("--width", args.width), ("--num-frames", args.num_frames)):
        at_least(value, 1, flag)
    if args.guidance_scale is not None and not math.isfinite(args.guidance_scale):
        raise UsageError(f"--guidance-scale must be a finite number, got {args.guidance_scale}")
    seeds = parse_seeds(args.seeds)
    writable_folder(args.out, "--out")
    folder = os.path.isdir(args.target)
    if not folder:
        if args.target not in zoo_names():
            raise UsageError(f"{args.target!r} is neither a pipeline folder nor a zoo model ({', '.join(zoo_names())})")
        given = [flag for flag, v in (("--height", args.height), ("--width", args.width),
                                      ("--num-frames", args.num_frames), ("--guidance-scale", args.guidance_scale))
                 if v is not None]  # fmt: skip
        if given:
            raise UsageError(f"{', '.join(given)}: zoo model {args.target} has a fixed size and guidance scale; "
                             "these flags are for pipeline folders")  # fmt: skip
        if args.device not in (None, "cpu"):
            raise UsageError(f"--device: zoo models run on the cpu, got {args.device!r}")
        if args.dtype != "float32":
            raise UsageError(f"--dtype: zoo models run in float32, got {args.dtype}")
        if args.prompt:
            raise UsageError(f"--prompt: zoo model {args.target} takes class labels, not prompts: use --labels")
        if args.labels:
            int_list(",".join(args.labels), "--labels")
    presets = args.presets if args.presets is not None else ([] if args.config else list(PRESETS[:3]))
    if not presets and not args.config:
        raise UsageError("nothing to compare: give --presets or --config")
    require("diffusers", "PIL", "matplotlib")
    configs = []
    for flag, specs in (("--presets", presets), ("--config", args.config)):
        for spec in specs:
            try:
                configs.append((spec, parse_config(spec)))
            except (TypeError, ValueError) as exc:
                raise UsageError(f"{flag}: {exc}") from None
    device = args.device
    if device is not None:
        _check_device(device)
    elif not folder:
        device = "cpu"
    else:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    call_kwargs = dict(height=args.height, width=args.width, num_frames=args.num_frames,
                       guidance_scale=args.guidance_scale)  # fmt: skip
    run(args.target, prompts=args.prompt, labels=args.labels, seeds=seeds, steps=args.steps, configs=configs,
        out=args.out, repeats=args.repeats, device=device, dtype=args.dtype, call_kwargs=call_kwargs,
        threads=args.threads, progress=args.progress)  # fmt: skip
    return 0
