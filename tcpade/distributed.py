"""Rank-consistent decisions when the image tokens are sharded across processes.

Under sequence (context) parallelism every rank holds a slice of the image tokens, runs
the transformer blocks on it and exchanges keys/values inside attention. Each rank's
tcpade history then sees only its slice, so its TSI sums, probe error and non-finite
count are partial: decided separately, one rank could skip a step while another runs the
blocks, and the collectives inside attention would pair up wrongly or hang. Here each
history write's 8 sums (tcpade.reference: sums over elements, a count) are summed over
the ranks, so every rank reads the sums of the whole sequence and takes the same
decision at every step. The predictions need nothing: every predictor works per token
row (the rational one fits one denominator per row over the channels, which a token
shard keeps whole), so a rank's prediction of its slice is that slice of the
single-process prediction.

How the sums are summed: ``all_gather`` of the 8-vectors, then a sum in rank order on
every rank, so every rank holds bit-identical values whatever the backend's reduction
order (an ``all_reduce`` is not promised to give every rank the same bits). One tiny
collective per history write and per skipped step (8 floats), issued on the device
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

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from .history import History

__all__ = ["ShardedHistory", "context_parallel_group", "follow_context_parallel", "reduce_sums", "shard"]


def reduce_sums(sums: torch.Tensor, group=None) -> torch.Tensor:
    """The 8 sums of a history write summed over the ranks of ``group``: identical bits
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


@dataclass
class ShardedHistory(History):
    """A History whose returned sums (and ``last_sums``) are summed over the ranks.

    ``group``: a callable returning the process group to reduce over, or None for no
    reduction at this call (so a transformer whose parallelism is enabled later is
    followed). Probe predictions are not reduced: their sums are never read (the update
    pass that follows measures the probe)."""

    group: Optional[Callable[[], Any]] = field(default=None, repr=False)

    def _reduce(self, sums: torch.Tensor) -> torch.Tensor:
        if self.group is None:
            return sums
        group = self.group()
        if group is None:
            return sums
        return reduce_sums(sums, group)

    def record(self, h_in, h_out, t, probe=False):
        sums = self._reduce(super().record(h_in, h_out, t, probe=probe))
        self.last_sums = sums
        return sums

    def predict(self, h_in, coef_values, variant, t_target, store=False, write_out=True, probe=False):
        out, sums = super().predict(h_in, coef_values, variant, t_target, store, write_out, probe)
        if probe:
            return out, sums
        sums = self._reduce(sums)
        if store:
            self.last_sums = sums
        return out, sums


def _install(runtime, group: Callable[[], Any]) -> None:
    if runtime.branches:
        raise RuntimeError(
            "tcpade.distributed: set up the sharding before the first transformer call (branches already exist)"
        )

    def factory(**kw):
        return ShardedHistory(group=group, **kw)

    runtime.history_factory = factory


def shard(target, group=None) -> None:
    """The image tokens of ``target`` (pipeline, transformer or Runtime with tcpade
    applied) are sharded over ``group`` (None: the default process group): reduce the
    sums of every history write over it, so all ranks decide alike."""
    from .api import runtime as _runtime
    from .policy import Runtime

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("tcpade.distributed.shard needs torch.distributed initialised (init_process_group)")
    rt = target if isinstance(target, Runtime) else _runtime(target)
    _install(rt, lambda: group if group is not None else dist.group.WORLD)


def follow_context_parallel(runtime, transformer) -> None:
    """Reduce over diffusers' context-parallel group whenever the transformer has one
    (looked up at each write; nothing is reduced, and no collective runs, without it)."""
    _install(runtime, lambda: context_parallel_group(transformer))
