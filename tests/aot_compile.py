"""Compile every Triton kernel specialisation for an H100/H200 (sm_90) without a GPU.

The interpreter that runs the kernels on CPU in tests accepts things the real compiler
rejects (e.g. non-constexpr globals read inside @triton.jit); this ahead-of-time compile
through Triton's own ptxas catches those on machines with no GPU. Run in a subprocess
with TRITON_INTERPRET unset (the jit decorators must produce compilable functions).
Prints one line per kernel and exits non-zero on the first failure.
"""

import importlib
import itertools
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

U = importlib.import_module("tcpade.kernels.update")
P = importlib.import_module("tcpade.kernels.predict")
TARGET = GPUTarget("cuda", 90, 32)


def compile_one(fn, sig, consts):
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=TARGET)
    print(f"ok {fn.__name__} {consts}")


def main():
    for dt in ("bf16", "fp16", "fp32"):
        p = "*" + dt
        usig = {
            "h_in_ptr": p,
            "h_out_ptr": p,
            "ring_ptr": p,
            "slots_ptr": "*i32",
            "h_prev_ptr": p,
            "partial_ptr": "*fp32",
            "n_elements": "i32",
            "slot_stride": "i32",
            "NSLOT": "constexpr",
            "HAS_IN": "constexpr",
            "HAS_PREV": "constexpr",
            "PROBE": "constexpr",
            "BLOCK": "constexpr",
            "EXACT_BF16": "constexpr",
            "IDX64": "constexpr",
        }
        for prev, probe in itertools.product((False, True), repeat=2):
            compile_one(
                U._update_kernel,
                usig,
                # HAS_IN off (a zero input, the output level) with and without the probe
                dict(NSLOT=3, HAS_IN=prev != probe, HAS_PREV=prev, PROBE=probe, BLOCK=4096, EXACT_BF16=False,
                     IDX64=prev),  # fmt: skip
            )
        esig = {
            "h_in_ptr": p,
            "ring_ptr": p,
            "slots_ptr": "*i32",
            "coef_ptr": "*fp32",
            "h_prev_ptr": p,
            "out_ptr": p,
            "partial_ptr": "*fp32",
            "n_elements": "i32",
            "slot_stride": "i32",
            "NSLOT": "constexpr",
            "VARIANT": "constexpr",
            "HAS_IN": "constexpr",
            "HAS_PREV": "constexpr",
            "STORE": "constexpr",
            "WRITE_OUT": "constexpr",
            "BLOCK": "constexpr",
            "EXACT_BF16": "constexpr",
            "IDX64": "constexpr",
        }
        for variant, nslot, store in itertools.product((0, 2, 3), (3, 4), (False, True)):
            compile_one(
                P._predict_ew_kernel,
                esig,
                dict(
                    NSLOT=nslot,
                    VARIANT=variant,
                    HAS_IN=nslot == 3,
                    HAS_PREV=True,
                    STORE=store,
                    WRITE_OUT=True,
                    BLOCK=4096,
                    EXACT_BF16=False,
                    IDX64=store,
                ),
            )
        rsig = {
            "h_in_ptr": p,
            "ring_ptr": p,
            "slots_ptr": "*i32",
            "coef_ptr": "*fp32",
            "h_prev_ptr": p,
            "out_ptr": p,
            "partial_ptr": "*fp32",
            "n_rows": "i32",
            "n_cols": "i32",
            "slot_stride": "i32",
            "NSLOT": "constexpr",
            "HAS_IN": "constexpr",
            "HAS_PREV": "constexpr",
            "STORE": "constexpr",
            "WRITE_OUT": "constexpr",
            "BLOCK_R": "constexpr",
            "BLOCK_C": "constexpr",
            "ONE_PASS": "constexpr",
            "EXACT_BF16": "constexpr",
            "IDX64": "constexpr",
        }
        for store, write_out, one_pass in ((False, True, True), (True, False, False), (True, True, True)):
            compile_one(
                P._predict_rational_kernel,
                rsig,
                dict(
                    NSLOT=3,
                    HAS_IN=not store,
                    HAS_PREV=True,
                    STORE=store,
                    WRITE_OUT=write_out,
                    BLOCK_R=1 if one_pass else 4,
                    BLOCK_C=4096 if one_pass else 1024,
                    ONE_PASS=one_pass,
                    EXACT_BF16=False,
                    IDX64=not one_pass,
                ),
            )
    # The interpreter's exact-bf16 rounding path must compile too (it is plain Triton).
    compile_one(
        U._update_kernel,
        dict(usig, h_in_ptr="*bf16", h_out_ptr="*bf16", ring_ptr="*bf16", h_prev_ptr="*bf16"),
        dict(NSLOT=3, HAS_IN=True, HAS_PREV=False, PROBE=False, BLOCK=1024, EXACT_BF16=True, IDX64=False),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
