"""Serving: many calls, derived pipelines, threads, faults, other caches.

A reduced bench/soak.py (the full one: 500 calls and 200 faults, bench/RESULTS.md): every call
of a long random sequence equals a fresh run of the same request bit for bit, tcpade's memory
stays flat, and a faulted call leaves nothing behind. Pipelines derived with ``from_pipe`` (own
scheduler, shared transformer) take T and the step's time from their own scheduler, also when
they run in threads at once; one pipeline object run by two threads at once is refused.
"""

import copy
import threading

import pytest
import torch

pytest.importorskip("diffusers")

import soak  # noqa: E402  (bench/soak.py)

import tcpade  # noqa: E402
from tcpade import TCPadeConfig  # noqa: E402
from tcpade.api import PipelineBusyError  # noqa: E402

torch.set_num_threads(1)


def _req(steps=20, size=16, images=1, cfg=True, preset="fast", seed=0):
    return soak.Request(steps, size, images, cfg, preset, seed)


def _derived(pipe):
    from diffusers import FluxPipeline

    p = FluxPipeline.from_pipe(pipe, scheduler=copy.deepcopy(pipe.scheduler))
    p.set_progress_bar_config(disable=True)
    return p


# ----------------------------------------------------------------------------------- many calls
def test_soak_every_call_equals_a_fresh_run_and_memory_is_flat():
    r = soak.soak(calls=40, warm=20, max_steps=16, seed=3, log=lambda *a: None)
    assert r["mismatches"] == [], r
    mem = r["memory"]
    first, last = mem[20], mem[40]
    # The history buffers, step records, branches and hooks after the same probe request: equal.
    for key in ("history", "records", "hooks", "branches"):
        assert first[key] == last[key], (key, mem)
    # tcpade's Python heap: only the bounded per-step-count caches may grow (a few KiB).
    assert last["heap"] - first["heap"] < 32 * 1024, r["grown"]
    assert len(r["kinds"]) >= 4


def test_faults_leave_nothing_behind():
    rows, _ = soak.fault_campaign(calls=21, max_steps=10, seed=5, log=lambda *a: None)
    for fault, row in rows.items():
        assert row["next_identical"] == row["n"], (fault, row)
        if fault.startswith("NaN"):
            assert row["nan_reported"] == row["fired"] and row["plan_kept"] == row["fixed"], row
        elif row["n"]:
            assert "completed" not in row["outcomes"], (fault, row)
    assert sum(row["n"] for row in rows.values()) == 21


# ----------------------------------------------------------------------------- derived pipelines
@torch.no_grad()
def test_a_derived_pipeline_reads_its_own_scheduler():
    """from_pipe with its own scheduler, called between calls of the original with another step
    count: each run equals a fresh run of its request (T and the clock from the caller's scheduler)."""
    pipe = soak.new_pipeline("fast")
    other = _derived(pipe)
    a, b = _req(steps=20), _req(steps=13, seed=1)
    ref_a, ref_b = soak.fresh(a), soak.fresh(b)
    soak.run(pipe, a)  # the original's scheduler now holds 20 steps
    for _ in range(2):
        out_b = soak.run(other, b)
        assert soak.same(out_b, soak.decisions(other), ref_b), str(tcpade.summary(other))
        assert len(tcpade.summary(other).branches["cond"]) == 13
        assert soak.same(soak.run(pipe, a), soak.decisions(pipe), ref_a)
    tcpade.remove(pipe)


# --------------------------------------------------------------------------------------- caches
def test_apply_and_remove_misuse_raise():
    pipe = soak.new_pipeline("fast")
    with pytest.raises(RuntimeError, match="already applied"):
        tcpade.apply(pipe, TCPadeConfig.fast())
    tcpade.remove(pipe)
    with pytest.raises(RuntimeError, match="not applied"):
        tcpade.remove(pipe)
    with pytest.raises(RuntimeError, match="not applied"):
        tcpade.remove(soak.new_pipeline(None))


@torch.no_grad()
def test_diffusers_cache_before_or_after_tcpade_is_refused():
    from diffusers import FirstBlockCacheConfig

    req = _req(steps=8)
    pipe = soak.new_pipeline(None)
    base = soak.run(pipe, req)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    with pytest.raises(RuntimeError, match="disable_cache"):
        tcpade.apply(pipe, TCPadeConfig.fast())
    pipe.transformer.disable_cache()
    tcpade.apply(pipe, TCPadeConfig.fast())
    ours = soak.run(pipe, req)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    with pytest.raises(RuntimeError, match="enabled on this FluxTransformer2DModel after tcpade.apply"):
        soak.run(pipe, req)
    pipe.transformer.disable_cache()
    assert torch.equal(soak.run(pipe, req), ours)
    tcpade.remove(pipe)
    assert torch.equal(soak.run(pipe, req), base)


@torch.no_grad()
def test_cache_dit_before_or_after_tcpade_is_refused():
    cache_dit = pytest.importorskip("cache_dit")
    cfg = cache_dit.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0)
    req = _req(steps=8)
    pipe = soak.new_pipeline(None)
    base = soak.run(pipe, req)
    cache_dit.enable_cache(pipe, cache_config=cfg)
    with pytest.raises(RuntimeError, match="cache-dit"):
        tcpade.apply(pipe, TCPadeConfig.fast())
    cache_dit.disable_cache(pipe)
    assert torch.equal(soak.run(pipe, req), base)
    tcpade.apply(pipe, TCPadeConfig.fast())
    ours = soak.run(pipe, req)
    cache_dit.enable_cache(pipe, cache_config=cfg)
    with pytest.raises(RuntimeError, match=r"cache-dit .* after tcpade.apply.*tcpade.remove"):
        soak.run(pipe, req)
    # (After that, cache-dit's disable_cache cannot always restore the transformer's forward,
    # which it saved with tcpade's hooks on: this pipeline is not used again.)
    tcpade.remove(pipe)
    assert ours.shape == base.shape
