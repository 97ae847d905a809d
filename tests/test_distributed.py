"""Rank consistency through torch.distributed: two CPU processes (gloo).

1. Sequence parallelism through diffusers' own context-parallel API (Ulysses, degree 2)
   on a tiny WanPipeline: each rank holds half of the image tokens; tcpade sums the TSI
   and probe-error sums over the ranks. Both ranks take the same decision at every step
   (same records, bit-identical probe errors), the same decisions as one process, and
   the same output as one process.
2. Data parallelism (a different prompt per rank, whole sequence on each): tcpade calls
   no collective at all, and each rank's output is its single-process output exactly.
3. Output level (``level="output"``) under the same sequence parallelism: the ranks predict
   the gathered output, decide alike and as one process does, and give its output.

diffusers 0.42.1 runs its context parallelism on CPU + gloo except for one line:
``enable_parallelism`` computes ``rank % torch.accelerator.device_count()``, which is
``rank % 0`` on a machine without an accelerator. The workers set ``device_count`` to 1
(the CPU as the one device) before calling it; nothing else is patched. (Its ring
attention needs the attention's log-sum-exp, which the native CPU backend lacks, hence
Ulysses.) With NCCL on GPUs tcpade.distributed runs the same code (the sums are
gathered on the device); that run is pending a multi-GPU machine.
"""

import math
import os
import socket
import sys
import traceback

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from tcpade.tools.tiny import TXT  # noqa: E402
from tcpade.tools.tiny import wan_pipeline as _wan_pipeline  # noqa: E402

import tcpade  # noqa: E402
from tcpade import TCPadeConfig  # noqa: E402  # noqa: E402

WORLD = 2
# The error policy at a tolerance the random-weight Wan trajectory meets at some steps
# (tests/test_api.py), so decisions depend on the measured sums, not on the step index.
CONFIG = TCPadeConfig(tolerance=0.3)
OUTPUT_CONFIG = TCPadeConfig(tolerance=0.3, level="output")
STEPS = 12


def _prompts(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, TXT, 32, generator=g), torch.randn(1, TXT, 32, generator=g)


def _generate(pipe, seed=1):
    pe, ne = _prompts(seed)
    out = pipe(
        prompt_embeds=pe,
        negative_prompt_embeds=ne,
        height=32,
        width=32,
        num_frames=5,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).frames
    return out.numpy().copy()


def _decisions(pipe):
    s = tcpade.summary(pipe)

    def err(r):  # None for "not measured" (NaN != NaN would fail the equality checks)
        return None if math.isnan(r.error) else r.error

    return {br: [(r.k, r.computed, r.reason, err(r), r.nonfinite) for r in recs] for br, recs in s.branches.items()}


def _run(cp: bool, seed=1, config=CONFIG):
    pipe, _ = _wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    tcpade.apply(pipe, config)  # before enable_parallelism: Wan splits at blocks.0 (tcpade.distributed)
    if cp:
        from diffusers import ContextParallelConfig

        pipe.transformer.set_attention_backend("native")
        pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
    with torch.no_grad():
        out = _generate(pipe, seed)
    return out, _decisions(pipe), tcpade.runtime(pipe).branches["cond"].history.ring.shape[2]


def _own_sharding(rank=None):
    """Our own sharded call: the policy's synthetic trajectory (tests/test_policy.py), each
    rank holding half of the 16 token rows, through ``tcpade.distributed.shard``."""
    from helpers import truth as _truth

    from tcpade import distributed as tdist
    from tcpade.policy.runtime import Runtime

    rt = Runtime(TCPadeConfig(tolerance=0.05))
    rt.set_steps(20)
    if rank is not None:
        tdist.shard(rt)
    step, outs = _truth(0), []
    for k in range(20):
        s = 3.0 * (1 - k / 20) / (1.0 + 2.0 * (1 - k / 20))  # FLUX-style shifted sigmas
        h_in, r = step(s)
        if rank is not None:
            h_in, r = (x[:, 8 * rank : 8 * (rank + 1)] for x in (h_in, r))
        predict = rt.decide("default", s)
        pred = predict(h_in) if predict is not None else None
        rt.finish("default", *((h_in, h_in + r) if pred is None else (None, None)))
        outs.append((h_in + r if pred is None else pred).numpy().copy())
    recs = rt.records("default")
    return [(r.k, r.computed, r.reason) for r in recs], np.stack(outs)


def _worker(rank, port, queue):
    try:
        import torch.distributed as dist
        from diffusers import ContextParallelConfig

        from tcpade import distributed as tdist

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        torch.accelerator.device_count = lambda: 1  # diffusers 0.42.1: rank % device_count (see the docstring)
        # Count tcpade's reductions, and every collective anyone makes.
        calls = {"reduce": 0, "collectives": 0}
        real_reduce = tdist.reduce_sums

        def counting_reduce(sums, group=None):
            calls["reduce"] += 1
            return real_reduce(sums, group)

        tdist.reduce_sums = counting_reduce
        names = ("all_gather", "all_reduce", "broadcast", "all_gather_into_tensor", "reduce_scatter_tensor",
                 "all_to_all_single", "barrier")  # fmt: skip
        for name in names:
            real = getattr(dist, name)

            def wrapped(*a, _real=real, **kw):
                calls["collectives"] += 1
                return _real(*a, **kw)

            setattr(dist, name, wrapped)

        out, dec, tokens = _run(cp=True)
        cp_calls = dict(calls)
        # The other order is refused: tcpade's hook on blocks.0 would see the unsplit sequence.
        late, _ = _wan_pipeline()
        late.transformer.set_attention_backend("native")
        late.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
        try:
            tcpade.apply(late, CONFIG)
            wrong_order = "accepted"
        except RuntimeError as exc:
            wrong_order = str(exc)
        own = _own_sharding(rank)
        calls.update(reduce=0, collectives=0)
        # Data parallelism: rank r generates prompt r's image with the whole sequence.
        dp_out, dp_dec, _ = _run(cp=False, seed=10 + rank)
        dp_calls = dict(calls)
        # Output level under sequence parallelism: the output is gathered on every rank.
        out_level = _run(cp=True, config=OUTPUT_CONFIG)[:2]
        queue.put((rank, dict(out=out, dec=dec, tokens=tokens, cp_calls=cp_calls, dp_out=dp_out, dp_dec=dp_dec,
                              dp_calls=dp_calls, wrong_order=wrong_order, own=own, out_level=out_level)))  # fmt: skip
        dist.destroy_process_group()
    except BaseException:
        queue.put((rank, traceback.format_exc()))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(sys.platform != "linux", reason="forks its workers (Linux)")
def test_two_ranks_decide_alike_and_match_one_process():
    import torch.multiprocessing as mp

    # fork: the workers start with diffusers already imported (a spawned worker spends
    # 10-70 s importing it on a busy 2-core machine); they use no thread the fork could
    # leave in a bad state (one torch thread, a fresh gloo group), as DataLoader workers do.
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, queue), daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        # The single-process runs, while the workers import and start; one thread, as in
        # the workers, so that the matmuls reduce in the same order.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.no_grad():
                ref_out, ref_dec, ref_tokens = _run(cp=False)
                dp_ref = [_run(cp=False, seed=10 + r) for r in range(WORLD)]
                ol_out, ol_dec, _ = _run(cp=False, config=OUTPUT_CONFIG)
        finally:
            torch.set_num_threads(threads)
        results = dict(queue.get(timeout=120) for _ in range(WORLD))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    for r, res in results.items():
        assert isinstance(res, dict), f"rank {r} failed:\n{res}"
    r0, r1 = results[0], results[1]

    # Each rank's history holds its half of the image tokens.
    assert r0["tokens"] == r1["tokens"] == ref_tokens // WORLD
    # The same decision on both ranks at every step, with bit-identical measured errors
    # (the sums are gathered and added in rank order on every rank) ...
    assert r0["dec"] == r1["dec"]
    # ... and the same decisions as one process; the decisions depend on the sums here.
    for br in ("cond", "uncond"):
        got, want = r0["dec"][br], ref_dec[br]
        assert [d[:3] for d in got] == [d[:3] for d in want], (br, got, want)
        assert any(not d[1] for d in got) and sum(d[1] for d in got) > 4, got  # skips and computes
        # Probe errors: the same sums, added in another order (fp32): within 1e-4 relative.
        for g, w in zip(got, want):
            assert (g[3] is None and w[3] is None) or abs(g[3] - w[3]) <= 1e-4 * abs(w[3]), (g, w)
    # One reduction per history write and per skip (8 floats each), no more.
    writes = sum(len(v) for v in r0["dec"].values())
    assert r0["cp_calls"]["reduce"] == writes, (r0["cp_calls"], writes)
    # The output gathered on each rank equals the single-process output: measured
    # bit-identical here (one thread per process; Ulysses gives each rank whole heads over
    # the whole sequence). Elsewhere Ulysses may reorder fp32 reductions (4.8e-7 max abs
    # measured on one forward with another thread count): 1e-4 relative L2 over 12 steps
    # leaves room for that (the decisions are compared exactly above).
    for res in (r0, r1):
        rel = np.linalg.norm(res["out"] - ref_out) / np.linalg.norm(ref_out)
        assert rel < 1e-4, rel
    assert np.array_equal(r0["out"], r1["out"])

    # Applying tcpade after diffusers split blocks.0 is refused with the remedy.
    assert "call tcpade.apply before transformer.enable_parallelism" in r0["wrong_order"]
    # Our own sharded call through tcpade.distributed.shard: same decisions as one process
    # on both ranks, and each rank's predictions are its rows of the one-process ones (the
    # predictors work per token row; 1e-6 covers fp32 reassociation in the row sums).
    own_dec, own_out = _own_sharding()
    assert sum(not d[1] for d in own_dec) >= 3, own_dec  # the decisions include skips
    for r, res in results.items():
        dec, out = res["own"]
        assert dec == own_dec
        want = own_out[:, :, 8 * r : 8 * (r + 1)]
        assert np.abs(out - want).max() <= 1e-6 * np.abs(want).max()

    # Data parallelism: no collective from tcpade or anyone, and exactly the one-process result.
    for r, res in results.items():
        assert res["dp_calls"] == {"reduce": 0, "collectives": 0}, res["dp_calls"]
        assert np.array_equal(res["dp_out"], dp_ref[r][0])
        assert res["dp_dec"] == dp_ref[r][1]
    assert not np.array_equal(r0["dp_out"], r1["dp_out"])  # two prompts, two images

    # Output level under sequence parallelism: the output the ranks predict from is the gathered
    # one, so both ranks decide alike, as one process does, and give its output.
    (o0, d0), (o1, d1) = r0["out_level"], r1["out_level"]
    assert d0 == d1
    for br in ("cond", "uncond"):
        assert [d[:3] for d in d0[br]] == [d[:3] for d in ol_dec[br]], (br, d0[br], ol_dec[br])
        assert any(not d[1] for d in d0[br]), d0[br]
    assert np.array_equal(o0, o1)
    assert np.linalg.norm(o0 - ol_out) / np.linalg.norm(ol_out) < 1e-4
    assert not np.array_equal(ol_out, ref_out)  # another prediction than block level's
