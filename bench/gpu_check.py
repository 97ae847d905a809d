"""GPU check of the fused kernels: correctness at full size and roofline-honest timings.

Run on a CUDA machine (bench/gpu_check.sh wraps it with the CUDA test suite):

    python bench/gpu_check.py --out DIR

For each storage dtype at FLUX.1-dev 1024x1024 size (1 x 4096 x 3072): the card's
device-to-device copy bandwidth (bytes read + written), then each kernel (update; predict
for every variant) against the same math as separate eager torch ops (tcpade.reference),
with triton.testing.do_bench medians (p20/p80), the bytes each kernel must move, GB/s and
% of the copy bandwidth; bf16 also sweeps the launch shape. Every kernel output is first
checked against the float64 reference on the same full-size inputs (output poisoned
first). ``--device cpu --quick`` is a dry run on tiny shapes for CI (no timing claims).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from tcpade import coef as K
from tcpade import ops, reference

FLUX_1024 = (1, 4096, 3072)
TIMES = [0.61, 0.74, 0.93]
T_TARGET = 0.45
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def bench(fn, device, reps=50, graph=False):
    """(median, p20, p80) in ms.

    graph=True replays fn from a CUDA graph: the GPU time of the kernels alone, without
    the Python and launch overhead of an eager call (which on a ~50 us kernel can exceed
    the kernel itself and leave the GPU idle between launches).
    """
    if device == "cuda":
        import triton

        if graph:
            res = triton.testing.do_bench_cudagraph(fn, rep=50, quantiles=[0.5, 0.2, 0.8], return_mode="median")
        else:
            res = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8], return_mode="median")
        return tuple(res)
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    return statistics.median(ts), ts[int(0.2 * (len(ts) - 1))], ts[int(0.8 * (len(ts) - 1))]


def copy_bandwidth(device, quick):
    n = (1 << 20) if quick else (1 << 28)  # 1 GiB of fp32 on the GPU: far past L2
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), device)[0]
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def make_inputs(shape, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def r(scale=1.0):
        return (torch.randn(shape, generator=g) * scale).to(dtype).to(device)

    base, vel = r(), r(0.2)
    ring = torch.stack([base + vel, base, base - vel + r(0.05)])
    return dict(
        h_in=r(), h_out=r(), ring=ring, slots=torch.tensor([0, 1, 2], dtype=torch.int32, device=device), prev=r()
    )


# Elements of hidden size each kernel must read + write at least once.
TENSORS_MOVED = {"update": 5, "paper": 4, "rational": 5, "reuse": 3, "linear": 4}


def run_kernel(name, x, coef, backend, **launch):
    if name == "update":
        if backend == "torch":
            return lambda: reference.update(x["h_in"], x["h_out"], x["ring"], x["slots"], None, False)
        if launch:
            from tcpade import kernels

            return lambda: kernels.update(x["h_in"], x["h_out"], x["ring"], x["slots"], None, False, **launch)
        return lambda: ops.update(x["h_in"], x["h_out"], x["ring"], x["slots"], None, False)
    cf = coef[name]
    if backend == "torch":
        return lambda: reference.predict(x["h_in"], x["ring"], x["slots"], cf, None, name, False, True)
    if launch:
        from tcpade import kernels

        return lambda: kernels.predict(x["h_in"], x["ring"], x["slots"], cf, None, name, False, True, **launch)
    return lambda: ops.predict(x["h_in"], x["ring"], x["slots"], cf, None, name, False, True)


def check_full_size(x, coef, device):
    """Kernel vs float64 reference on the full-size inputs; returns max errors by kernel."""
    errs = {}
    ring64 = x["ring"].double().cpu()
    slots = x["slots"].cpu()
    ring = x["ring"].clone()
    sums = ops.update(x["h_in"], x["h_out"], ring, x["slots"], None, False)
    ref_sums = reference.update(x["h_in"].cpu(), x["h_out"].cpu(), ring64.clone(), slots, None, False, torch.float64)
    errs["update_tsi"] = abs(reference.tsi_from_sums(sums.tolist()) - reference.tsi_from_sums(ref_sums.tolist()))
    for v in K.VARIANTS:
        cf = coef[v]
        out = torch.full_like(x["h_in"], float("nan"))
        got, s = ops.predict(x["h_in"], x["ring"], x["slots"], cf, None, v, False, True)
        out.copy_(got)
        ref, _ = reference.predict(
            x["h_in"].cpu(), ring64, slots, cf.cpu().double(), None, v, False, True, torch.float64
        )
        scale = ref.abs().max().item()
        errs[v] = (out.cpu().double() - ref).abs().max().item() / scale
        errs[v + "_nonfinite"] = s[5].item()
    return errs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, one dtype, no sweep (CI dry run)")
    ap.add_argument("--out", default=None, help="directory for gpu_check.json")
    args = ap.parse_args(argv)
    device = args.device
    shape = (1, 64, 96) if args.quick else FLUX_1024
    dtypes = {"bf16": torch.bfloat16} if args.quick else DTYPES
    info = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "date": time.strftime("%Y-%m-%d"),
        "shape": list(shape),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    copy_gbs = copy_bandwidth(device, args.quick)
    info["copy_GBps"] = copy_gbs
    rows, checks = [], {}
    for dname, dtype in dtypes.items():
        x = make_inputs(shape, dtype, device)
        coef = {v: K.coef_tensor(K.build_coef(v, "middle", TIMES, T_TARGET, 3, 3), device) for v in K.VARIANTS}
        checks[dname] = check_full_size(x, coef, device)
        elt = x["h_in"].numel() * x["h_in"].element_size()
        for name in ["update", *K.VARIANTS]:
            nbytes = TENSORS_MOVED[name] * elt
            cuda = device == "cuda"
            t_k = bench(run_kernel(name, x, coef, "auto"), device, graph=cuda)
            t_call = bench(run_kernel(name, x, coef, "auto"), device)
            t_t = bench(run_kernel(name, x, coef, "torch"), device)
            best = (t_k[0], "default")
            if cuda and not args.quick:
                for block in (2048, 4096, 8192):
                    for warps in (4, 8):
                        t = bench(run_kernel(name, x, coef, "auto", block=block, num_warps=warps), device, graph=True)[
                            0
                        ]
                        if t < best[0]:
                            best = (t, f"block={block},warps={warps}")
            gbs = nbytes / (t_k[0] * 1e-3) / 1e9
            rows.append(
                dict(
                    dtype=dname,
                    kernel=name,
                    MB=nbytes / 1e6,
                    ms=t_k[0],
                    p20=t_k[1],
                    p80=t_k[2],
                    call_ms=t_call[0],
                    GBps=gbs,
                    pct_copy=100 * gbs / copy_gbs,
                    torch_ms=t_t[0],
                    speedup=t_t[0] / t_k[0],
                    best_ms=best[0],
                    best_cfg=best[1],
                    best_pct_copy=100 * nbytes / (best[0] * 1e-3) / 1e9 / copy_gbs,
                )
            )
    result = dict(info=info, checks=checks, rows=rows)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
            json.dump(result, f, indent=1)
    print(f"\n## Kernels on {info['device']} (torch {info['torch']}, triton {info['triton']}, {info['date']})")
    print(f"shape {tuple(shape)}; device-to-device copy: {copy_gbs:.0f} GB/s (read + write)\n")
    print("kernel ms: CUDA-graph replay (GPU time of the op's kernels); op call ms: one eager call;")
    print("eager torch: the same math as separate torch ops (tcpade.reference), eager.\n")
    print(
        "| dtype | kernel | MB moved | kernel ms (p20-p80) | GB/s | % copy | op call ms | eager torch ms "
        "| x faster | best launch (ms, % copy) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['dtype']} | {r['kernel']} | {r['MB']:.1f} | {r['ms']:.4f} ({r['p20']:.4f}-{r['p80']:.4f}) | "
            f"{r['GBps']:.0f} | {r['pct_copy']:.0f}% | {r['call_ms']:.4f} | {r['torch_ms']:.3f} | "
            f"{r['speedup']:.1f} | {r['best_cfg']} {r['best_ms']:.4f} {r['best_pct_copy']:.0f}% |"
        )
    print("\nfull-size max relative error vs float64 reference:")
    for d, c in checks.items():
        print(f"  {d}: " + ", ".join(f"{k}={v:.2e}" for k, v in c.items()))
    return result


if __name__ == "__main__":
    main()
