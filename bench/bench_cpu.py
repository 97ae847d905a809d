"""CPU kernels: the C++ extension (tcpade._C) vs the same math as eager torch ops vs a copy.

For each storage dtype and each op (update, update with probe, predict per variant with
store=False and write_out=True; paper with h_prev and its default input correction) this times

* C++    : tcpade._C called directly with data_ptr()s (default OpenMP thread count);
* torch  : tcpade.core.reference.update / predict with compute_dtype=float32, i.e. the same
           math as separate eager torch ops (torch.set_num_threads(2) unless --threads);
* copy   : dst.copy_(src) on buffers sized so that the copy moves (reads + writes) the
           same number of bytes the kernel must move, the memory-bandwidth ceiling.

Bytes the kernel must move (one tensor = rows * C * itemsize):
  update          reads h_in, h_out, R1, R2, writes R                  5 tensors
  update (probe)  + reads the probe in the write slot                  6
  predict paper   reads h_in, R1, R2, h_prev; writes out, h_prev        6
  predict rational reads h_in, R1, R2, R3; writes out                  5
  predict reuse   reads h_in, R1; writes out                            3
  predict linear  reads h_in, R1, R2; writes out                        4
(paper's second fallback reads R3/R4 only where both pade and fb1 are non-finite: 0 here.)

Usage (from the repo root, package installed with `pip install -e .`):
  python bench/bench_cpu.py                 # FLUX-sized 1 x 4096 x 3072, 20 reps
  python bench/bench_cpu.py --quick         # small shapes, 2 reps (CI smoke)
  python bench/bench_cpu.py --out bench/cpu.md
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys

import torch
from _bench_common import cpu_name, time_cpu_interleaved

from tcpade import coef as K
from tcpade import reference as ref

try:
    from tcpade import _C
except ImportError as exc:  # the extension is optional (TCPADE_NO_NATIVE=1 or no compiler)
    _C = None
    _IMPORT_ERROR = exc

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
VARIANTS = K.VARIANTS
PREDICT_TENSORS = {"paper": 6, "rational": 5, "reuse": 3, "linear": 4}


def make_inputs(shape, dtype, nslot=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    ring = torch.stack([(base + 0.1 * i * torch.randn(shape, generator=g)) for i in range(nslot)]).to(dtype)
    h_in = torch.randn(shape, generator=g).to(dtype)
    h_out = (h_in.float() + base).to(dtype)
    h_prev = (h_in.float() + 0.05 * torch.randn(shape, generator=g)).to(dtype)
    return h_in, h_out, ring, h_prev


def bench_dtype(shape, dtype, reps, warmup, rows_out):
    rows, C = math.prod(shape[:-1]), shape[-1]
    nslot = 3
    slots = [2, 1, 0]  # R1 in slot 2, R2 in 1, R3 in 0 (= the write slot)
    slots_t = torch.tensor(slots)
    code = DTYPE_CODE[dtype]
    h_in, h_out, ring, h_prev = make_inputs(shape, dtype, nslot)
    tensor_bytes = h_in.numel() * h_in.element_size()
    out = torch.empty_like(h_in)

    copy_bufs = {}

    def copy_fn(ntensors):
        n = ntensors * tensor_bytes // 2  # read n + write n = the kernel's bytes
        if n not in copy_bufs:
            copy_bufs[n] = (torch.ones(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8))
        src, dst = copy_bufs[n]
        return lambda: dst.copy_(src)

    cases = []
    for probe in (False, True):
        name = "update" + (" (probe)" if probe else "")
        ntens = 6 if probe else 5
        ring_c, ring_t = ring.clone(), ring.clone()

        def cpp(probe=probe, ring_c=ring_c):
            _C.update(h_in.data_ptr(), h_out.data_ptr(), ring_c.data_ptr(), slots, 0, rows, C, nslot, code, probe)

        def eager(probe=probe, ring_t=ring_t):
            ref.update(h_in, h_out, ring_t, slots_t, None, probe, compute_dtype=torch.float32)

        cases.append((name, ntens, cpp, eager))

    for variant in VARIANTS:
        gamma = K.default_gamma(variant)
        cf = K.build_coef(variant, "middle", [0.7, 0.8, 0.9], 0.6, 5, nslot, gamma=gamma)
        cf_t = torch.tensor(cf, dtype=torch.float32)
        hp_c, hp_t = (h_prev.clone(), h_prev.clone()) if gamma else (None, None)
        vid = K.check_variant(variant)

        def cpp(cf=cf, hp_c=hp_c, vid=vid):
            _C.predict(
                h_in.data_ptr(),
                ring.data_ptr(),
                slots,
                cf,
                0 if hp_c is None else hp_c.data_ptr(),
                out.data_ptr(),
                rows,
                C,
                nslot,
                code,
                vid,
                False,
            )

        def eager(cf_t=cf_t, hp_t=hp_t, variant=variant):
            ref.predict(h_in, ring, slots_t, cf_t, hp_t, variant, False, True, compute_dtype=torch.float32)

        cases.append((f"predict {variant}", PREDICT_TENSORS[variant], cpp, eager))

    for name, ntens, cpp, eager in cases:
        nbytes = ntens * tensor_bytes
        t_c, t_t, t_k = time_cpu_interleaved([cpp, eager, copy_fn(ntens)], reps, warmup)
        rows_out.append(
            {
                "dtype": str(dtype).replace("torch.", ""),
                "op": name,
                "MB": nbytes / 1e6,
                "cpp": t_c,
                "torch": t_t,
                "copy": t_k,
                "cpp_gbs": nbytes / (t_c[0] * 1e-3) / 1e9,
                "copy_gbs": nbytes / (t_k[0] * 1e-3) / 1e9,
            }
        )
        r = rows_out[-1]
        print(
            f"  {r['dtype']:8s} {name:18s} C++ {t_c[0]:8.2f} ms  torch {t_t[0]:8.2f} ms  copy {t_k[0]:8.2f} ms",
            file=sys.stderr,
            flush=True,
        )


def fmt_ms(t):
    return f"{t[0]:.3g} ({t[1]:.3g}-{t[2]:.3g})"


def markdown(rows, shape, reps, torch_threads, cpp_threads) -> str:
    lines = [
        f"Shape {tuple(shape)}, median (p20-p80) ms over {reps} reps after warm-up (C++, torch and copy "
        "interleaved rep by rep); "
        f"torch threads {torch_threads}, C++ OpenMP threads {cpp_threads}. "
        "GB/s = bytes the kernel must move / median time.",
        "",
        "| dtype | op | MB moved | C++ ms | torch eager ms | copy ms | C++ GB/s | copy GB/s "
        "| torch / C++ | C++ / copy |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['op']} | {r['MB']:.3g} | {fmt_ms(r['cpp'])} | {fmt_ms(r['torch'])} | "
            f"{fmt_ms(r['copy'])} | {r['cpp_gbs']:.1f} | {r['copy_gbs']:.1f} | "
            f"{r['torch'][0] / r['cpp'][0]:.1f}x | {r['cpp'][0] / r['copy'][0]:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, 2 reps (CI smoke)")
    ap.add_argument("--out", default=None, help="write the markdown table to this path")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for the eager path")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args(argv)

    if _C is None:
        print(f"SKIP: tcpade._C is not built ({_IMPORT_ERROR}); nothing to benchmark.", file=sys.stderr)
        return 0

    torch.set_num_threads(args.threads)
    shape = (1, 64, 96) if args.quick else (1, 4096, 3072)
    reps = args.reps or (2 if args.quick else 20)
    warmup = 1 if args.quick else 3
    rows = []
    for name in args.dtypes.split(","):
        bench_dtype(shape, DTYPES[name.strip()], reps, warmup, rows)

    isa = _C.isa() if hasattr(_C, "isa") else "?"
    header = (
        f"Machine: {cpu_name()}, {os.cpu_count()} CPUs; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), tcpade._C kernels: {isa} "
        f"({_C.num_threads()} OpenMP threads); Python {platform.python_version()}; "
        f"{datetime.date.today().isoformat()}.\n\n"
    )
    noisy = [r for r in rows for t in (r["cpp"], r["copy"]) if t[2] > 1.5 * t[1]]
    if noisy:
        print(f"WARNING: {len(noisy)} timings with p80 > 1.5 x p20 (a noisy machine?)", file=sys.stderr)
    md = header + markdown(rows, shape, reps, torch.get_num_threads(), _C.num_threads())
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
