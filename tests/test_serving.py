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
from tcpade import TCPadeConfig  # noqa: E402  # noqa: E402
from tcpade.integrations.api import PipelineBusyError  # noqa: E402

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


# --------------------------------------------------------------------------------------- threads
def _in_threads(*jobs, timeout=120):
    """Run the callables in threads started together; their results (or exceptions) in order."""
    start = threading.Barrier(len(jobs))
    out = [None] * len(jobs)

    def wrap(i, job):
        start.wait()
        try:
            out[i] = job()
        except BaseException as exc:  # noqa: B902 (reported to the test)
            out[i] = exc

    threads = [threading.Thread(target=wrap, args=(i, job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a thread did not finish (deadlock?)"
    return out


@torch.no_grad()
def test_derived_pipelines_in_threads_get_their_sequential_results():
    """Two pipelines that share one transformer (from_pipe, each its own scheduler) run in two
    threads at once, three requests each (other step counts, sizes, CFG on and off): every output
    and every thread's decisions equal the fresh sequential run of the request."""
    pipe = soak.new_pipeline("fast")
    reqs = [[_req(steps=20), _req(steps=9, size=24, seed=2), _req(steps=14, cfg=False, seed=4)],
            [_req(steps=13, seed=1), _req(steps=20, images=2, seed=3), _req(steps=6, size=32, seed=5)]]  # fmt: skip
    refs = [[soak.fresh(r) for r in rs] for rs in reqs]
    pipes = [_derived(pipe), _derived(pipe)]

    def job(i):
        return [soak.same(soak.run(pipes[i], r), soak.decisions(pipes[i]), ref) for r, ref in zip(reqs[i], refs[i])]

    for _ in range(2):
        assert _in_threads(lambda: job(0), lambda: job(1)) == [[True] * 3, [True] * 3]
    # The original pipeline, afterwards in this thread: its fresh result too.
    assert soak.same(soak.run(pipe, reqs[0][0]), soak.decisions(pipe), refs[0][0])
    tcpade.remove(pipe)


@torch.no_grad()
def test_one_pipeline_in_two_threads_at_once_is_refused():
    """diffusers does not support one pipeline object run by two threads at once: the second call
    raises PipelineBusyError at its first transformer call, and so does the first call at its next
    one (the second call reset the shared scheduler); never a silently wrong image."""
    pipe = soak.new_pipeline("fast")
    req = _req(steps=12)
    ref = soak.fresh(req)
    paused, tried = threading.Event(), threading.Event()

    def pause(p, i, t, kw):  # the first call waits after its first step until the second has tried
        if i == 0:
            paused.set()
            tried.wait(60)
        return kw

    def first():
        return soak.run(pipe, req, callback_on_step_end=pause)

    def second():
        paused.wait(60)
        try:
            return soak.run(pipe, req)
        finally:
            tried.set()

    results = _in_threads(first, second)
    assert all(isinstance(r, PipelineBusyError) for r in results), results
    assert "another thread" in str(results[0]) and "from_pipe" in str(results[1])
    # Afterwards, one call at a time: the fresh result.
    out = soak.run(pipe, req)
    assert soak.same(out, soak.decisions(pipe), ref)
    tcpade.remove(pipe)


@torch.no_grad()
def test_keyboard_interrupt_in_one_thread_does_not_block_the_other():
    """A KeyboardInterrupt inside a transformer call skips torch's always-called hooks (the call
    never reaches tcpade's after-hook); another thread's pipeline that shares the transformer
    still runs, and gets its fresh result."""
    pipe = soak.new_pipeline("fast")
    a, b = _derived(pipe), _derived(pipe)
    req = _req(steps=10)
    ref = soak.fresh(req)
    remove = soak._inject_block_raise(pipe.transformer.single_transformer_blocks[0], 7, "KeyboardInterrupt")
    with pytest.raises(KeyboardInterrupt):
        soak.run(a, req)
    remove()
    (got,) = _in_threads(lambda: soak.same(soak.run(b, req), soak.decisions(b), ref), timeout=60)
    assert got is True
    assert soak.same(soak.run(a, req), soak.decisions(a), ref)
    tcpade.remove(pipe)


@torch.no_grad()
def test_img2img_derived_pipeline_next_to_text_to_image_in_threads():
    """FluxImg2ImgPipeline.from_pipe (strength 0.6: 12 of 20 steps, from its scheduler's begin
    index; CFG as two calls per step outside cache contexts: branches "default" and "default.2",
    counted per thread) in one thread, a text-to-image pipeline in another, same transformer:
    both get their fresh sequential results."""
    from diffusers import FluxImg2ImgPipeline

    def img2img(pipe):
        pipe.vae.register_to_config(shift_factor=0.0)  # (the tiny VAE has none; FLUX's is a number)
        p = FluxImg2ImgPipeline.from_pipe(pipe, scheduler=copy.deepcopy(pipe.scheduler))
        p.set_progress_bar_config(disable=True)
        return p

    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    pe, pp, ne, npp = soak.EMBEDS

    def run_img2img(p):
        return p(image=image, prompt_embeds=pe, pooled_prompt_embeds=pp, negative_prompt_embeds=ne,
                 negative_pooled_prompt_embeds=npp, true_cfg_scale=2.0, strength=0.6, height=16, width=16,
                 num_inference_steps=20, output_type="latent",
                 generator=torch.Generator().manual_seed(0)).images  # fmt: skip

    fresh_i2i = img2img(soak.new_pipeline("fast"))
    ref_i2i = (run_img2img(fresh_i2i), soak.decisions(fresh_i2i))
    assert sorted(ref_i2i[1]) == ["default", "default.2"] and len(ref_i2i[1]["default"]) == 12
    req = _req(steps=13, seed=1)
    ref_t2i = soak.fresh(req)
    pipe = soak.new_pipeline("fast")
    i2i, t2i = img2img(pipe), _derived(pipe)

    def job_i2i():
        return [soak.same(run_img2img(i2i), soak.decisions(i2i), ref_i2i) for _ in range(3)]

    def job_t2i():
        return [soak.same(soak.run(t2i, req), soak.decisions(t2i), ref_t2i) for _ in range(3)]

    assert _in_threads(job_i2i, job_t2i) == [[True] * 3, [True] * 3]
    tcpade.remove(pipe)


@torch.no_grad()
def test_compiled_blocks_in_threads():
    """compile_repeated_blocks(fullgraph=True) (aot_eager) and two from_pipe pipelines in threads:
    each equals the compiled sequential run of its request."""
    pipe = soak.new_pipeline("fast")
    pipe.transformer.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
    try:
        reqs = [_req(steps=12), _req(steps=9, seed=1)]
        refs = [(soak.run(pipe, r), soak.decisions(pipe)) for r in reqs]
        pipes = [_derived(pipe), _derived(pipe)]

        def job(i):
            return [soak.same(soak.run(pipes[i], reqs[i]), soak.decisions(pipes[i]), refs[i]) for _ in range(2)]

        assert _in_threads(lambda: job(0), lambda: job(1)) == [[True] * 2, [True] * 2]
    finally:
        tcpade.remove(pipe)
        torch._dynamo.reset()
