"""Rank-consistent decisions when the image tokens are sharded across processes.

Under sequence (context) parallelism every rank holds a slice of the image tokens, runs
the transformer blocks on it and exchanges keys/values inside attention. Each rank's
tcpade history then sees only its slice, so its TSI sums, probe error and non-finite
count are partial: decided separately, one rank could skip a step while another runs the
blocks, and the collectives inside attention would pair up wrongly or hang. Here the sums
of each history write and prediction (``tcpade.core.history.Sums``: sums over elements, a
count) are summed over the ranks through the Runtime's one hook for it,
``Runtime.reduce``, so every rank reads the sums of the whole sequence and takes the same
decision at every step. (A fixed schedule reads no sums to decide; the reduction then keeps
the summary's TSI and fallback counts those of the whole sequence.) The predictions need
nothing: every predictor works per token row (the rational one fits one denominator per row over the channels, which a token
shard keeps whole), so a rank's prediction of its slice is that slice of the
single-process prediction.

How the sums are summed: ``all_gather`` of the sums vectors, then a sum in rank order on
every rank, so every rank holds bit-identical values whatever the backend's reduction
order (an ``all_reduce`` is not promised to give every rank the same bits). One tiny
collective per history write and per skipped step (one small vector), issued on the device
stream where the sums are produced (NCCL: no host wait of its own).

* ``tcpade.apply`` follows diffusers' context parallelism by itself: once
  ``transformer.enable_parallelism(config=ContextParallelConfig(...))`` has run (before or
  after ``apply``), the sums are reduced over its mesh's ranks. With a block-level split
  (Wan's ``_cp_plan`` splits at ``blocks.0``), call ``tcpade.apply`` FIRST: diffusers runs
  the hook registered last outermost, and tcpade must see the split tokens.
* ``shard(target, group)``: your own sharding (each rank calls the transformer on its
  slice of the image tokens): reduce over ``group`` (None = the default group).
* Data parallelism (each rank its own prompts, the whole sequence on every rank) needs no
  synchronisation and gets none: without either of the above, tcpade calls no collective.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from ..policy.runtime import Runtime, attached_runtime

__all__ = ["context_parallel_group", "follow_context_parallel", "reduce_sums", "shard"]


def reduce_sums(sums: torch.Tensor, group=None) -> torch.Tensor:
    """The sums of a history write summed over the ranks of ``group``: identical bits
    on every rank (gathered, then added in rank order)."""
    world = dist.get_world_size(group)
    if world == 1:
        return sums
    parts = [torch.empty_like(sums) for _ in range(world)]
    dist.all_gather(parts, sums.contiguous(), group=group)
    total = parts[0].clone()
    for p in parts[1:]:
        total += p
    return total


def context_parallel_group(transformer) -> Optional[Any]:
    """The process group over which diffusers' context parallelism splits this
    transformer's sequence, or None when it is not enabled."""
    module = getattr(transformer, "_orig_mod", transformer)
    cp = getattr(getattr(module, "_parallel_config", None), "context_parallel_config", None)
    if cp is None:
        return None
    mesh = getattr(cp, "_flattened_mesh", None)
    if mesh is None:
        raise RuntimeError(
            "diffusers' context parallel config on this transformer has no mesh (was enable_parallelism interrupted?)"
        )
    return mesh.get_group()


def _install(runtime, group: Callable[[], Any]) -> None:
    if runtime.branches:
        raise RuntimeError(
            "tcpade.distributed: set up the sharding before the first transformer call (branches already exist)"
        )

    def reduce(sums: torch.Tensor) -> torch.Tensor:
        g = group()
        return sums if g is None else reduce_sums(sums, g)

    runtime.reduce = reduce


def shard(target, group=None) -> None:
    """The image tokens of ``target`` (pipeline, transformer or Runtime with tcpade
    applied) are sharded over ``group`` (None: the default process group): reduce the
    sums of every history write over it, so all ranks decide alike."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("tcpade.distributed.shard needs torch.distributed initialised (init_process_group)")
    rt = target if isinstance(target, Runtime) else attached_runtime(target)
    _install(rt, lambda: group if group is not None else dist.group.WORLD)


def follow_context_parallel(runtime, transformer) -> None:
    """Reduce over diffusers' context-parallel group whenever the transformer has one
    (looked up at each write; nothing is reduced, and no collective runs, without it)."""
    _install(runtime, lambda: context_parallel_group(transformer))
