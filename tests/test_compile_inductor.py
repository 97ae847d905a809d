"""torch.compile as users run it: the default backend (inductor), ``fullgraph=True``, on tiny
pipelines shaped like the real ones, with tcpade applied first (``TCPadeConfig.fast()``).

* FLUX: ``FluxPipeline`` with true CFG (negative prompt embeddings, ``true_cfg_scale`` 2: a
  "cond" and an "uncond" call per step), 2 double and 2 single blocks, at 16 x 16 and then
  8 x 12 (64 and 24 image tokens: what FLUX's own VAE gives at 128 x 128 and 64 x 96; the
  tiny VAE's scale factor is 1);
* Wan: ``WanPipeline`` with CFG (guidance 5, "cond" / "uncond" calls), 2 blocks, 5 frames of
  32 x 32 and then (regional compile only, to keep the file's runtime down) 48 x 48;
* DiT: ``DiTPipeline`` (CFG batched into one call), 3 blocks, its one sample size.

Each in both forms users write: ``pipe.transformer.compile_repeated_blocks(fullgraph=True)``
(DiT has no ``_repeated_blocks`` in diffusers 0.42.1: its blocks are compiled one by one, which
is what that method does) and ``pipe.transformer = torch.compile(pipe.transformer,
fullgraph=True)``. At every resolution the first run must finish within dynamo's default
recompile limit (8 per code object, checked to be the default here, raised nowhere) with no
graph break, and a second run, under ``torch._dynamo.config.error_on_recompile=True``, must
compile nothing (no frame, no graph, no recompile). Both runs must compute the steps the eager
run computed, per branch (``tcpade.summary(pipe).computed``), and give its output.

The compiled variants are counted per code object (the cache entries dynamo keeps on it,
``_debug_get_cache_entry_list``, for every code object dynamo saw since ``torch._dynamo.reset()``)
and compared with ``VARIANTS`` (the numbers docs/runtime.md gives). Under a regional compile
diffusers' ``HookRegistry.new_forward`` (hooks.py) is the one code object every hooked block of
every class runs through, so all block variants share its limit.

Tolerance: inductor fuses the fp32 arithmetic of each block (other summation orders in norms,
attention and matmul epilogues), so it differs from eager by a few ulps per block; the skipped
steps extrapolate from residuals that carry those differences and the sampler carries them on.
Measured (largest difference from eager): 7e-7 (FLUX latents, scale ~5), 1.5e-6 (Wan latents,
scale ~5), 6e-6 (DiT images in [0, 1]). 1e-4 absolute + 1e-4 relative is 17x to 140x that and
far below what skipping changes: the eager tcpade run differs from the eager run that computes
every step by 0.065 (FLUX), 0.054 (Wan) and 0.76 (DiT) with 6 of 10 steps skipped.

Runtime: about 3 minutes on 2 CPU cores with an empty inductor cache (FLUX regional and whole
model about 50 s each).
"""

import os

import pytest
import torch

pytest.importorskip("diffusers")

import tcpade  # noqa: E402
from tcpade import TCPadeConfig  # noqa: E402
from tcpade.tools import tiny  # noqa: E402
from tcpade.tools.tiny import CompileCount  # noqa: E402

STEPS = 10
TOL = dict(atol=1e-4, rtol=1e-4)
DEFAULT_RECOMPILE_LIMIT = 8

HOOKS = "hooks.py:new_forward"  # diffusers' HookRegistry wrapper: every hooked module's forward
FIRST = "adapters.py:before_first"  # tcpade's forward pre-hook on the stack's first block
AFTER = "adapters.py:after_block"  # tcpade's forward hook on the stack's first block

# Compiled variants per code object after the first and the second run at each resolution (the
# second run adds none). Regional: each block class compiles a compute and a skip variant in
# diffusers' shared hook code (FLUX: 2 classes -> 4); a new resolution compiles them once more
# with dynamic shapes (8), later resolutions reuse those. The first block's forward hook
# compiles a compute and a skip variant, its pre-hook one, per shape family. Whole model: a
# compute and a skip graph per shape family. One entry per resolution run.
VARIANTS = {
    ("flux", "regional"): [{HOOKS: 4, FIRST: 1, AFTER: 2}, {HOOKS: 8, FIRST: 2, AFTER: 4}],
    ("flux", "full"): [{HOOKS: 2}, {HOOKS: 4}],
    ("wan", "regional"): [{HOOKS: 2, FIRST: 1, AFTER: 2}, {HOOKS: 4, FIRST: 2, AFTER: 4}],
    ("wan", "full"): [{HOOKS: 2}],
    ("dit", "regional"): [{HOOKS: 2, FIRST: 1, AFTER: 2}],
    ("dit", "full"): [{HOOKS: 2}],
}


def variants():
    """Cache entries per code object dynamo has seen since the last reset ({file:function: n})."""
    from torch._dynamo.convert_frame import input_codes
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    out = {}
    for ref in input_codes.seen:
        code = ref()
        n = len(_debug_get_cache_entry_list(code)) if code is not None else 0
        if n:
            key = f"{os.path.basename(code.co_filename)}:{code.co_name}"
            out[key] = out.get(key, 0) + n
    return out


def _flux():
    pipe, generate = tiny.flux_family_pipeline(layers=(2, 2))
    return pipe, (lambda size: generate(STEPS, size=size)), [(16, 16), (8, 12)], ("cond", "uncond")


def _wan():
    pipe, generate = tiny.wan_family_pipeline()
    return pipe, (lambda size: generate(STEPS, size=size)), [32, 48], ("cond", "uncond")


def _dit():
    pipe, generate = tiny.dit_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe, (lambda size: generate(STEPS)), [None], ("default",)


PIPELINES = {"flux": _flux, "wan": _wan, "dit": _dit}


def _compile(pipe, form):
    if form == "full":
        pipe.transformer = torch.compile(pipe.transformer, fullgraph=True)
    elif getattr(pipe.transformer, "_repeated_blocks", None):
        pipe.transformer.compile_repeated_blocks(fullgraph=True)
    else:  # DiT in diffusers 0.42.1: no _repeated_blocks; compile the blocks as that method would
        for _, block in tcpade.integrations.adapters.find_adapter(pipe.transformer).stack(pipe.transformer):
            block.compile(fullgraph=True)


CASES = [(f, m) for f in PIPELINES for m in ("regional", "full")]


@pytest.mark.parametrize("family, form", CASES, ids=["-".join(c) for c in CASES])
def test_inductor_fullgraph_as_users_compile(family, form):
    torch._dynamo.reset()
    assert torch._dynamo.config.recompile_limit == DEFAULT_RECOMPILE_LIMIT  # the default, not raised
    pipe, generate, sizes, branches = PIPELINES[family]()
    sizes = sizes[: len(VARIANTS[family, form])]
    tcpade.apply(pipe, TCPadeConfig.fast())
    try:
        eager = {}
        for size in sizes:  # the eager references, same pipeline (compiled in place below)
            out = generate(size)
            eager[size] = out, {b: tcpade.summary(pipe).computed(b) for b in branches}
            assert 0 < len(eager[size][1][branches[0]]) < STEPS  # the run skips some steps
        _compile(pipe, form)
        counts = []
        for size in sizes:
            ref, computed = eager[size]
            with CompileCount() as first:
                out = generate(size)
            assert first.graphs > 0 and first.graph_breaks == 0, (size, first.graph_breaks)
            assert {b: tcpade.summary(pipe).computed(b) for b in branches} == computed
            torch.testing.assert_close(out, ref, **TOL, msg=f"{family} {form} {size}: first run")
            after_first = variants()
            with torch._dynamo.config.patch(error_on_recompile=True), CompileCount() as second:
                out = generate(size)
            assert second.frames == second.graphs == 0 and second.recompiles == [], second.recompiles[:1]
            assert second.graph_breaks == 0
            assert {b: tcpade.summary(pipe).computed(b) for b in branches} == computed
            torch.testing.assert_close(out, ref, **TOL, msg=f"{family} {form} {size}: second run")
            assert variants() == after_first
            assert max(after_first.values()) <= DEFAULT_RECOMPILE_LIMIT
            counts.append(after_first)
        assert counts == VARIANTS[family, form], counts
    finally:
        tcpade.remove(pipe)
