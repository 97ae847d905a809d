"""``tcpade demo`` (or ``python -m tcpade demo``): TC-Pade on a really trained model, no download.

Runs the zoo's default model (``flux-digits``: a FLUX-architecture transformer trained on
scikit-learn's digits, shipped with tcpade) once with full computation and then with
tcpade's presets, on the same seeds, and prints per run: block-stack passes, the wall-clock
speedup measured in this run, and PSNR / SSIM against the full run. Writes a side-by-side
image grid (rows: full, then each preset) and the TSI / skip-decision plot of the fast
preset into ``--out``. Needs the ``demo`` extra (``pip install 'tcpade[demo]'``).
"""

from __future__ import annotations

import argparse
import os

from ..integrations.progress import Progress
from .args import UsageError, at_least, require, writable_folder, zoo_names

# Imported by the ``tcpade`` command to build its parser: torch, diffusers and the zoo load
# only when the demo runs.


def run(model_name="flux-digits", steps=20, out="tcpade-demo", repeats=3, seed=0, threads=1, progress=None):
    """The demo: ``tcpade bench``'s runner and timing on a zoo image model, with the demo's
    inputs (every class twice, or five times with two classes) and table; returns
    {method: bench.Result}."""
    import torch

    from .. import zoo
    from . import bench
    from .runner import ZooRunner

    # One thread: the model is small (a 20-step run of 20 samples is ~0.3 s), and on a shared
    # machine OpenMP threads that spin-wait for a busy core cost more than they bring.
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    if model_name not in zoo.names():
        raise ValueError(f"unknown zoo model {model_name!r}; available: {zoo.names()}")
    model = zoo.load(model_name)
    spec = model.spec
    if len(spec.sample_shape) != 3:
        raise ValueError(f"the demo draws images; {model_name!r} makes clips (use bench/quality.py for it)")
    labels = list(range(spec.num_classes)) * (2 if spec.num_classes > 2 else 5)
    seeds = [seed * 1000 + i for i in range(len(labels))]
    methods = [("full", None), *((p, bench.parse_config(p)) for p in ("adaptive", "slow", "fast"))]

    bar = Progress(1 + repeats * len(methods), f"tcpade demo: {model_name}", enabled=progress)
    results = bench.measure(ZooRunner(model, seeds, labels, steps), methods, repeats, bar)
    ref = results["full"]
    print(f"tcpade demo: {model_name} ({type(model.transformer).__name__}, "
          f"{sum(p.numel() for p in model.transformer.parameters()):,} parameters), {len(seeds)} samples, "
          f"{steps} steps, CPU {torch.get_num_threads()} thread(s)")  # fmt: skip
    print(f"{'method':9s} {'passes':>8s} {'fewer passes':>13s} {'wall speedup':>13s} {'PSNR dB':>8s} {'SSIM':>7s}")
    for name, _ in methods:
        r = results[name]
        passes = max(r.passes) if r.passes else steps
        psnr, ssim = bench.quality(r, ref)
        print(f"{name:9s} {passes:>5d}/{steps:<2d} {steps / passes:>12.2f}x {ref.seconds / r.seconds:>12.2f}x "
              f"{psnr:>8.2f} {ssim:>7.4f}")  # fmt: skip
    os.makedirs(out, exist_ok=True)
    grid = os.path.join(out, "samples.png")
    bench._grid([results[n].images for n, _ in methods], [str(lab) for lab in labels], [n for n, _ in methods], grid)
    tsi = os.path.join(out, "tsi_fast.png")
    results["fast"].summary.plot(tsi)
    print(f"\nwrote {grid} (rows: {', '.join(n for n, _ in methods)}) and {tsi}")
    print(results["fast"].summary)
    return results


def add_cli(subparsers):
    p = subparsers.add_parser("demo",
                              help="full computation vs tcpade's presets on a trained model shipped with tcpade",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    clips = ", ".join(zoo_names("clips"))
    p.add_argument("--model", default="flux-digits",
                   help=f"a zoo image model: {', '.join(zoo_names('images'))} (default flux-digits; "
                   f"{clips} makes clips: tcpade bench runs it)")  # fmt: skip
    p.add_argument("--steps", type=int, default=20, help="denoising steps, >= 2 (default 20)")
    p.add_argument("--out", default="tcpade-demo", help="folder for samples.png and tsi_fast.png")
    p.add_argument("--repeats", type=int, default=3, help="timing repeats, >= 1 (best of; default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads, >= 1 (default 1)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stdout (default: when stdout is a terminal)")  # fmt: skip
    p.set_defaults(_parser=p)
    return p


def run_cli(args) -> int:
    """Run ``tcpade demo`` from parsed arguments; a bad value raises UsageError (one line, exit 2)."""
    if args.steps < 2:
        raise UsageError(f"--steps must be >= 2, got {args.steps}")
    at_least(args.repeats, 1, "--repeats")
    at_least(args.threads, 1, "--threads")
    writable_folder(args.out, "--out")
    if args.model not in zoo_names():
        raise UsageError(f"--model: unknown zoo model {args.model!r}; available: {', '.join(zoo_names('images'))}")
    if args.model not in zoo_names("images"):
        raise UsageError(f"--model: the demo draws images; {args.model!r} makes clips (use tcpade bench {args.model})")
    require("diffusers", "safetensors", "PIL", "matplotlib")
    run(args.model, args.steps, args.out, args.repeats, threads=args.threads, progress=args.progress)
    return 0
