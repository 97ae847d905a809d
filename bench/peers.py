"""The peer caches of the quality benchmark, made to run on the three zoo models through ``model.sample``.

``bench/quality.py`` imports :class:`Method`, :func:`peer_methods` and :func:`count_macs` from here. A
``Method`` enables one peer cache at one knob setting on ``model.transformer`` (running a calibration
pass first where the method needs one), ``model.sample(...)`` then runs with it, and ``disable`` restores
the exact uncached model (bit-identical outputs; ``tests/test_peers.py`` checks it).

What runs where (diffusers 0.42.1, cache-dit 1.5.3):

==============================  ==========================  ====================  ====================
group                           flux-digits (Flux)          dit-faces (DiT)       wan-digits (Wan)
==============================  ==========================  ====================  ====================
FirstBlockCache                 yes                         yes (1)               yes
TaylorSeer (per-module)         yes, default identifiers    yes (1)(2)            yes (2)
TaylorSeer (whole-block)        yes                         yes (1)               yes
TaylorSeer (lite)               yes                         no (3)                yes
MagCache                        yes                         yes (1)               yes
cache-dit DBCache               yes (Pattern_1 x 2)         yes (Pattern_3, 4)    yes (Pattern_2)
cache-dit DBCache+TaylorSeer    yes                         yes (4)               yes
cache-dit DBCache+DMD / +FoCa   yes                         yes (4)               yes
cache-dit mask (4 calibrators)  yes (5)                     yes (4)(5)            yes (5)
SeaCache                        no (6)                      no (6)                yes
==============================  ==========================  ====================  ====================

(1) ``DiTTransformer2DModel`` has no ``CacheMixin`` in diffusers 0.42.1 (no ``enable_cache``): the
    hooks are applied with ``diffusers.hooks.apply_*`` and removed the way ``CacheMixin.disable_cache``
    removes them (same hooks, same registry).
(2) TaylorSeer's default identifiers (``^blocks.*attn``, ``^transformer_blocks.*attn``, ...) are
    fullmatched, so they match FLUX's ``attn`` but none of DiT's / Wan's ``attn1`` / ``attn2``: with the
    defaults nothing would be cached there. "per-module" therefore uses the same rule (every attention
    module of every block) spelled for those names, ``...\\.attn\\d$``.
(3) Lite mode caches ``^proj_out$`` and zeroes every block on cached steps; DiT's output projection
    is ``proj_out_1`` / ``proj_out_2``, so nothing would predict the output: not run on DiT.
(4) cache-dit's own DiT adapter: ``Pattern_3`` plus its ``DiTPatchFunctor`` that replaces the
    transformer's forward; ``disable`` puts the class forward back (cache-dit's release alone would
    leave the patched forward in place).

(5) cache-dit's ``steps_computation_mask`` with the "static" policy: a fixed schedule (no threshold), fed an
    evenly spaced mask (:func:`evenly_spaced_mask`) or any other (:func:`cachedit_mask`,
    :func:`mask_from_steps`). cache-dit requires ``Fn_compute_blocks >= 1``, so on a masked step the first
    block of each block list still runs (:func:`first_block_share` of the MACs: large on the zoo's 4-6
    block models, small on real ones); the grid therefore holds both the pass counts the benchmark
    compares at and the most passes that still reach each level on this model. Calibrators: none (the
    cached residual reused), TaylorSeer order 1, DMD (window 6), FoCa.
(6) SeaCache (diffusers 0.42.1) has built-in adapters for ``WanTransformer3DModel`` (text-to-video,
    ``in_channels == out_channels``) and Cosmos 3 only; other transformers need a ``raw_vision_callback``
    and a flow-matching sigma in [0, 1] from the loop's cache context (DiT's DDIM loop has none). Run on Wan.

CFG (DiT, Wan: two transformer calls per step, inside ``cache_context("cond")`` / ``("uncond")``): the
diffusers hooks keep one state per context, so each branch caches on its own; cache-dit counts calls
and is told ``enable_separate_cfg=True`` so even calls are "cond", odd ones "uncond".

MagCache is calibrated per model, step count, seeds and labels (those given to ``enable``, i.e. the
evaluation inputs themselves: the most favourable calibration MagCache can get): one full pass with
``calibrate=True`` logs the per-step ratios of every branch (captured from the INFO log record); the
cond branch's ratios are used (MagCacheConfig takes one array for all branches) and both are kept in
``Method.info["mag_ratios"]``.

cache-dit's transformer-only context is not fully reset between generations (with skipping, every
second run of the same inputs differed); a stateful diffusers hook on the transformer refreshes it
(``cache_dit.refresh_context`` with the same configs) whenever ``tcpade.sample`` resets the hooks, i.e.
at the start and end of every run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

__all__ = [
    "GROUPS",
    "Method",
    "block_lists",
    "cachedit_mask",
    "evenly_spaced_mask",
    "first_block_share",
    "level_passes",
    "levels",
    "mask_from_steps",
    "calibrate_mag_ratios",
    "clear_calibrations",
    "count_macs",
    "peer_methods",
]

GROUPS = (
    "FirstBlockCache",
    "TaylorSeer (per-module)",
    "TaylorSeer (whole-block)",
    "TaylorSeer (lite)",
    "MagCache",
    "cache-dit DBCache",
    "cache-dit DBCache+TaylorSeer",
    "cache-dit DBCache+DMD",
    "cache-dit DBCache+FoCa",
    "cache-dit mask",
    "cache-dit mask+TaylorSeer",
    "cache-dit mask+DMD",
    "cache-dit mask+FoCa",
    "SeaCache",
)

_BLOCK_LISTS = {"flux": ("transformer_blocks", "single_transformer_blocks"), "dit": ("transformer_blocks",),
                "wan": ("blocks",)}  # fmt: skip


def _family(transformer: nn.Module) -> str:
    name = type(transformer).__name__
    for key, fam in (("Flux", "flux"), ("DiT", "dit"), ("Wan", "wan")):
        if name.startswith(key):
            return fam
    raise ValueError(f"no peer-cache support for {name}")


def block_lists(transformer: nn.Module) -> list:
    """The transformer's block ModuleLists (the stack every cache here skips parts of)."""
    return [getattr(transformer, n) for n in _BLOCK_LISTS[_family(transformer)]]


# -- compute counter ----------------------------------------------------------------------------------


@dataclass
class MacCount:
    macs: int = 0
    calls: int = 0  # Linear forwards counted


@contextlib.contextmanager
def count_macs(transformer: nn.Module, first_only: bool = False):
    """Counts the multiply-accumulates of every ``nn.Linear`` inside the block lists that really ran.

    Plain torch forward hooks on the Linear modules: they fire inside ``Module.__call__`` whatever
    diffusers' HookRegistry or cache-dit did to ``forward`` of the modules above them, and a skipped
    block never calls its Linears, so skipped work is not counted. A Linear counts only while a block
    is running (pre/post hooks on the blocks), so a block's submodule reused outside the stack does not.
    The result is ``.macs`` (and ``.calls``, the Linear forwards counted). ``first_only``: count only the
    first block of each block list."""
    count = MacCount()
    depth = [0]  # > 0 while a block of the stack is running

    def enter(mod, args, kwargs=None):
        depth[0] += 1

    def leave(mod, args, out):
        depth[0] -= 1

    def hook(mod, args, out):
        # Only inside a block: DiT reuses transformer_blocks[0].norm1.emb after the stack (its output
        # head's conditioning), which runs on skipped steps too and is not block-stack work.
        if depth[0] > 0:
            count.macs += mod.in_features * mod.out_features * math.prod(args[0].shape[:-1])
            count.calls += 1

    handles = []
    for blocks in block_lists(transformer):
        for block in blocks[:1] if first_only else blocks:
            handles.append(block.register_forward_pre_hook(enter))
            handles.append(block.register_forward_hook(leave, always_call=True))
            handles += [m.register_forward_hook(hook) for m in block.modules() if isinstance(m, nn.Linear)]
    try:
        yield count
    finally:
        for h in handles:
            h.remove()


# -- methods ----------------------------------------------------------------------------------------


@dataclass
class Method:
    group: str
    label: str
    knobs: dict
    _enable: Callable = field(repr=False, default=None)
    _disable: Callable = field(repr=False, default=None)
    info: dict = field(default_factory=dict, repr=False)  # e.g. MagCache's calibrated ratios

    def enable(self, model, steps: int, seeds, labels) -> None:
        self._enable(self, model, steps, seeds, labels)

    def disable(self, model) -> None:
        self._disable(self, model)


# diffusers ------------------------------------------------------------------------------------------


def _diffusers_enable(transformer, cfg) -> None:
    if hasattr(transformer, "enable_cache"):
        transformer.enable_cache(cfg)
        return
    # DiT has no CacheMixin: the same hooks through the functions enable_cache itself calls.
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig
    from diffusers.hooks import HookRegistry, apply_first_block_cache, apply_mag_cache, apply_taylorseer_cache

    # A registry on the root is what makes tcpade.sample enter cache_context (FBC and TaylorSeer only
    # hook submodules; without it their hooks see no context and raise).
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    apply = {FirstBlockCacheConfig: apply_first_block_cache, MagCacheConfig: apply_mag_cache,
             TaylorSeerCacheConfig: apply_taylorseer_cache}[type(cfg)]  # fmt: skip
    apply(transformer, cfg)
    # The root registry caches its list of child registries; new block hooks stay unseen (no context
    # reaches them) until it is invalidated, as CacheMixin.enable_cache does.
    registry.invalidate_child_registries_cache()
    transformer._peers_cache_config = cfg


def _diffusers_disable(transformer) -> None:
    if hasattr(transformer, "disable_cache"):
        if getattr(transformer, "_cache_config", None) is not None:
            transformer.disable_cache()
        return
    cfg = transformer.__dict__.pop("_peers_cache_config", None)
    if cfg is None:
        return
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig
    from diffusers.hooks import HookRegistry
    from diffusers.hooks import first_block_cache as fbc
    from diffusers.hooks import mag_cache as mc
    from diffusers.hooks import taylorseer_cache as ts

    names = {FirstBlockCacheConfig: (fbc._FBC_LEADER_BLOCK_HOOK, fbc._FBC_BLOCK_HOOK),
             MagCacheConfig: (mc._MAG_CACHE_LEADER_BLOCK_HOOK, mc._MAG_CACHE_BLOCK_HOOK),
             TaylorSeerCacheConfig: (ts._TAYLORSEER_CACHE_HOOK,)}[type(cfg)]  # fmt: skip
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    for n in names:
        registry.remove_hook(n, recurse=True)
    registry.invalidate_child_registries_cache()


def _off_diffusers(method, model) -> None:
    t = model.transformer
    _diffusers_disable(t)
    # A hook on the transformer itself (SeaCache's root hook) is removed by putting the original bound
    # forward back as an instance attribute: drop it, so the class forward runs as before.
    f = t.__dict__.get("forward")
    if f is not None and getattr(f, "__self__", None) is t and getattr(f, "__func__", None) is type(t).forward:
        del t.__dict__["forward"]


def _fbc(threshold: float) -> Method:
    def on(m, model, steps, seeds, labels):
        from diffusers import FirstBlockCacheConfig

        _diffusers_enable(model.transformer, FirstBlockCacheConfig(threshold=threshold))

    return Method("FirstBlockCache", f"FBC th={threshold:g}", {"threshold": threshold}, on, _off_diffusers)


_WHOLE_BLOCK = [r"^transformer_blocks\.\d+$", r"^single_transformer_blocks\.\d+$", r"^blocks\.\d+$"]
_PER_MODULE = {"flux": None,  # diffusers' defaults: the "attn" of every double and single block
               "dit": [r"^transformer_blocks\.\d+\.attn\d$"], "wan": [r"^blocks\.\d+\.attn\d$"]}  # fmt: skip


def _taylorseer(mode: str, family: str, interval: int, order: int, before: int) -> Method:
    knobs = {"cache_interval": interval, "max_order": order, "disable_cache_before_step": before}

    def on(m, model, steps, seeds, labels):
        from diffusers import TaylorSeerCacheConfig

        kw = dict(knobs, taylor_factors_dtype=torch.float32)
        if mode == "whole-block":
            kw["cache_identifiers"] = _WHOLE_BLOCK
        elif mode == "lite":
            kw["use_lite_mode"] = True
        elif _PER_MODULE[family] is not None:
            kw["cache_identifiers"] = _PER_MODULE[family]
        _diffusers_enable(model.transformer, TaylorSeerCacheConfig(**kw))

    short = {"per-module": "TS-mod", "whole-block": "TS-blk", "lite": "TS-lite"}[mode]
    return Method(f"TaylorSeer ({mode})", f"{short} N={interval} O={order} w={before}", knobs, on, _off_diffusers)


class _RatioCapture(logging.Handler):
    """Collects the ratio lists MagCache logs at INFO when a calibration run ends (one per branch)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.runs: list = []

    def emit(self, record):
        msg = record.getMessage()
        prefix = "MagCache Calibration Results: "
        if msg.startswith(prefix):
            import ast

            self.runs.append(ast.literal_eval(msg[len(prefix) :]))


def calibrate_mag_ratios(model, steps: int, seeds, labels) -> list:
    """One full-computation pass with MagCache in calibration mode; the per-step ratios of each branch
    in call order (cond, then uncond with CFG), each ``steps`` long."""
    from diffusers import MagCacheConfig

    log = logging.getLogger("diffusers.hooks.mag_cache")
    handler, level = _RatioCapture(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    propagate, log.propagate = log.propagate, False  # keep diffusers' console handler out of it
    try:
        _diffusers_enable(model.transformer, MagCacheConfig(calibrate=True, num_inference_steps=steps))
        with contextlib.redirect_stdout(None):  # the hook also prints the ratios
            model.sample(seeds, labels, steps)
    finally:
        _diffusers_disable(model.transformer)
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate
    branches = 2 if model.spec.guidance_scale != 1 else 1
    if len(handler.runs) != branches or any(len(r) != steps for r in handler.runs):
        raise RuntimeError(f"MagCache calibration: expected {branches} x {steps} ratios, got {handler.runs}")
    return handler.runs


# model -> {(steps, seeds, labels): ratios}: one calibration per model object and setting (weak keys, so a
# new model object never sees another's ratios; call clear_calibrations() after changing weights in place).
_MAG_CACHE = weakref.WeakKeyDictionary()


def clear_calibrations() -> None:
    _MAG_CACHE.clear()


def _magcache(threshold: float, max_skip: int, retention: float) -> Method:
    knobs = {"threshold": threshold, "max_skip_steps": max_skip, "retention_ratio": retention}

    def on(m, model, steps, seeds, labels):
        from diffusers import MagCacheConfig

        key = (steps, tuple(int(s) for s in seeds), tuple(int(x) for x in labels))
        cache = _MAG_CACHE.setdefault(model, {})
        if key not in cache:
            cache[key] = calibrate_mag_ratios(model, steps, seeds, labels)
        runs = cache[key]
        m.info["mag_ratios"] = runs
        cfg = MagCacheConfig(num_inference_steps=steps, mag_ratios=torch.tensor(runs[0]), **knobs)
        _diffusers_enable(model.transformer, cfg)

    label = f"Mag th={threshold:g} K={max_skip} r={retention:g}"
    return Method("MagCache", label, knobs, on, _off_diffusers)


# cache-dit ------------------------------------------------------------------------------------------


def _cachedit_adapter(transformer):
    from cache_dit import BlockAdapter, ForwardPattern

    fam = _family(transformer)
    if fam == "flux":
        # cache-dit's own Flux adapter (diffusers >= 0.35 blocks): both lists return (encoder, hidden).
        return BlockAdapter(transformer=transformer, blocks=[transformer.transformer_blocks,
                            transformer.single_transformer_blocks],
                            forward_pattern=[ForwardPattern.Pattern_1, ForwardPattern.Pattern_1],
                            check_forward_pattern=True, has_separate_cfg=False)  # fmt: skip
    if fam == "dit":
        from cache_dit.caching.patch_functors import DiTPatchFunctor

        return BlockAdapter(transformer=transformer, blocks=transformer.transformer_blocks,
                            forward_pattern=ForwardPattern.Pattern_3, patch_functor=DiTPatchFunctor(),
                            check_forward_pattern=True, has_separate_cfg=True)  # fmt: skip
    return BlockAdapter(transformer=transformer, blocks=transformer.blocks, forward_pattern=ForwardPattern.Pattern_2,
                        check_forward_pattern=True, has_separate_cfg=True)  # fmt: skip


_PATCHED_ATTRS = ("forward", "_norm1_emb", "_is_patched")
_REFRESH_HOOK = "peers_cachedit_refresh"


def _refresh_hook_cls():
    from diffusers.hooks import ModelHook

    class RefreshHook(ModelHook):
        _is_stateful = True

        def __init__(self, cfg, cal):
            super().__init__()
            self.cfg, self.cal = cfg, cal

        def reset_state(self, module):
            import copy

            import cache_dit

            with _quiet_cachedit():
                cache_dit.refresh_context(module, cache_config=copy.deepcopy(self.cfg),
                                          calibrator_config=copy.deepcopy(self.cal))  # fmt: skip
            return module

    return RefreshHook


def _RefreshHook(cfg, cal):  # noqa: N802  (the class needs diffusers, imported lazily)
    return _refresh_hook_cls()(cfg, cal)


def _calibrator_config(calibrator):
    """cache-dit's calibrator config for ``calibrator``: None, ("taylorseer", order), ("dmd", history)
    or ("foca",). Every one forecasts the cached Bn residual (and the encoder stream's)."""
    if calibrator is None:
        return None
    from cache_dit import TaylorSeerCalibratorConfig
    from cache_dit.caching.cache_contexts.calibrators import DMDCalibratorConfig, FoCaCalibratorConfig

    kind = calibrator[0]
    if kind == "taylorseer":
        return TaylorSeerCalibratorConfig(taylorseer_order=calibrator[1])
    if kind == "dmd":
        return DMDCalibratorConfig(dmd_history=calibrator[1])
    if kind == "foca":
        return FoCaCalibratorConfig()
    raise ValueError(f"calibrator: expected None, ('taylorseer', order), ('dmd', history) or ('foca',), got {calibrator!r}")


def _check_calibrator(calibrator):
    ok = calibrator is None or (
        isinstance(calibrator, tuple) and calibrator and (
            (calibrator[0] in ("taylorseer", "dmd") and len(calibrator) == 2 and isinstance(calibrator[1], int)
             and calibrator[1] >= 1) or calibrator == ("foca",)))  # fmt: skip
    if not ok:
        raise ValueError(f"calibrator: expected None, ('taylorseer', order >= 1), ('dmd', history >= 1) or "
                         f"('foca',), got {calibrator!r}")  # fmt: skip
    return calibrator


def _cal_tag(calibrator) -> str:
    if calibrator is None:
        return ""
    if calibrator[0] == "taylorseer":
        return f" TS{calibrator[1]}"
    if calibrator[0] == "dmd":
        return f" DMD{calibrator[1]}"
    return " FoCa"


def _dbcache(threshold: float, fn: int, bn: int, warmup: int, max_cont: int, calibrator=None, mask=None,
             group: Optional[str] = None, label: Optional[str] = None) -> Method:  # fmt: skip
    """cache-dit's DBCache at one knob setting. ``mask``: a 0/1 list, one entry per step (1: compute),
    given to cache-dit as ``steps_computation_mask`` with the "static" policy (the 0 steps are always
    cached, the 1 steps always computed: a fixed schedule, no threshold)."""
    _check_calibrator(calibrator)
    knobs = {"residual_diff_threshold": threshold, "Fn_compute_blocks": fn, "Bn_compute_blocks": bn,
             "max_warmup_steps": warmup, "max_continuous_cached_steps": max_cont}  # fmt: skip
    if calibrator is not None:
        knobs["calibrator"] = "/".join(str(c) for c in calibrator)
    if mask is not None:
        mask = [int(x) for x in mask]
        knobs = {"mask": "".join(map(str, mask)), "warmup": warmup}
        if calibrator is not None:
            knobs["calibrator"] = "/".join(str(c) for c in calibrator)

    def on(m, model, steps, seeds, labels):
        import cache_dit
        from cache_dit import DBCacheConfig

        if mask is not None and len(mask) != steps:
            raise ValueError(f"cache-dit step mask: {len(mask)} entries for a {steps}-step run (need one per step)")
        t = model.transformer
        m.info["added_attrs"] = [a for a in _PATCHED_ATTRS if a not in t.__dict__ and a not in t._modules]
        m.info["module_order"] = list(t._modules)
        kw = {}
        if mask is not None:
            kw = dict(steps_computation_mask=list(mask), steps_computation_policy="static")
        cfg = DBCacheConfig(
            Fn_compute_blocks=fn, Bn_compute_blocks=bn, residual_diff_threshold=threshold,
            max_warmup_steps=warmup, max_continuous_cached_steps=max_cont, num_inference_steps=steps,
            enable_separate_cfg=model.spec.guidance_scale != 1, **kw,
        )  # fmt: skip
        cal = _calibrator_config(calibrator)
        with _quiet_cachedit():
            cache_dit.enable_cache(_cachedit_adapter(t), cache_config=cfg, calibrator_config=cal)
        # cache-dit's transformer-only context does not fully reset between generations (with skipping,
        # every second run of the same inputs differed); tcpade.sample resets the transformer's
        # stateful diffusers hooks at the start and end of every run, so a hook there refreshes it.
        from diffusers.hooks import HookRegistry

        HookRegistry.check_if_exists_or_initialize(t).register_hook(_RefreshHook(cfg, cal), _REFRESH_HOOK)

    def off(m, model):
        import cache_dit

        t = model.transformer
        registry = getattr(t, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(_REFRESH_HOOK) is not None:
            registry.remove_hook(_REFRESH_HOOK)
        if "added_attrs" not in m.info:  # enable failed before cache-dit was applied
            return
        with _quiet_cachedit():
            cache_dit.disable_cache(t)
        # The DiT patch functor's forward (and its helper attributes) outlive cache-dit's release.
        # _norm1_emb is a registered submodule (it would otherwise stay in the state_dict as a duplicate).
        for a in m.info.pop("added_attrs", []):
            t.__dict__.pop(a, None)
            t._modules.pop(a, None)
        # cache-dit re-registers the block lists (FLUX: they move behind norm_out / proj_out): restore the
        # original order so named_modules() / state_dict() iterate exactly as before.
        order = m.info.pop("module_order", None)
        if order is not None:
            mods = t._modules
            t._modules = type(mods)(
                [(k, mods[k]) for k in order if k in mods] + [(k, v) for k, v in mods.items() if k not in order]
            )

    if group is None:
        group = "cache-dit DBCache" + {None: "", "taylorseer": "+TaylorSeer", "dmd": "+DMD", "foca": "+FoCa"}[
            None if calibrator is None else calibrator[0]]  # fmt: skip
    if label is None:
        label = f"DB F{fn}B{bn} th={threshold:g} w={warmup} mc={max_cont}" + _cal_tag(calibrator)
    return Method(group, label, knobs, on, off)


def evenly_spaced_mask(steps: int, passes: int, warmup: int = 2) -> list:
    """A 0/1 compute mask of ``steps`` entries with exactly ``passes`` ones: the first ``warmup`` steps,
    then the other ``passes - warmup`` spread evenly (rounded) over the remaining steps, starting right
    after the warm-up."""
    if not 1 <= passes <= steps:
        raise ValueError(f"passes: expected 1 <= passes <= steps ({steps}), got {passes}")
    warmup = max(0, min(warmup, passes))
    ones = set(range(warmup))
    rest = passes - warmup
    span = steps - warmup
    ones |= {warmup + (k * span) // rest for k in range(rest)}
    return [1 if i in ones else 0 for i in range(steps)]


def mask_from_steps(computed, steps: int) -> list:
    """The 0/1 mask of ``steps`` entries that computes exactly the step indices in ``computed``."""
    computed = sorted({int(i) for i in computed})
    if computed and not (0 <= computed[0] and computed[-1] < steps):
        raise ValueError(f"computed steps must lie in [0, {steps}), got {computed}")
    return [1 if i in computed else 0 for i in range(steps)]


def cachedit_mask(mask, calibrator=None, label: Optional[str] = None, group: Optional[str] = None) -> Method:
    """cache-dit's fixed step mask: the steps marked 1 in ``mask`` (one entry per step) run the whole
    block stack; on the steps marked 0 (static policy: always cached) cache-dit still runs the first block
    of each block list (it requires ``Fn_compute_blocks >= 1``) and adds the cached residual of the rest,
    forecast by ``calibrator`` (None: reused as is; ("taylorseer", order), ("dmd", history), ("foca",)).
    Any schedule can be fed in, e.g. a calibrated one through :func:`mask_from_steps`. The leading run of
    ones is cache-dit's warm-up."""
    _check_calibrator(calibrator)
    mask = [int(x) for x in mask]
    if not mask or any(x not in (0, 1) for x in mask) or mask[0] != 1:
        raise ValueError(f"mask: expected a non-empty 0/1 list that computes step 0, got {mask}")
    lead = next((i for i, x in enumerate(mask) if x == 0), len(mask))
    passes = sum(mask)
    if group is None:
        group = "cache-dit mask" + {None: "", "taylorseer": "+TaylorSeer", "dmd": "+DMD", "foca": "+FoCa"}[
            None if calibrator is None else calibrator[0]]  # fmt: skip
    if label is None:
        label = f"mask {passes}/{len(mask)} w={lead}" + _cal_tag(calibrator)
    return _dbcache(0.0, 1, 0, lead, -1, calibrator, mask=mask, group=group, label=label)


_FIRST_BLOCK_SHARE = {}


def first_block_share(model_name: str) -> float:
    """The share of one run's block MACs spent in the first block of each block list (what cache-dit
    still runs on a cached step), measured on a one-step run of the (randomly initialised) zoo
    architecture: the MAC counter once on the whole stack, once on the first blocks only."""
    if model_name not in _FIRST_BLOCK_SHARE:
        from tcpade import zoo

        m = zoo.build(model_name).eval()
        with count_macs(m.transformer) as whole:
            m.sample([0], [0], 1)
        with count_macs(m.transformer, first_only=True) as first:
            m.sample([0], [0], 1)
        _FIRST_BLOCK_SHARE[model_name] = first.macs / whole.macs
    return _FIRST_BLOCK_SHARE[model_name]


def mask_pass_counts(model_name: str, steps: int) -> list:
    """Pass counts of the evenly spaced cache-dit masks: the benchmark's levels' counts (steps / level, as
    tcpade computes them), and, since cache-dit's cached steps still run a first block, the most passes
    that still reach each level and 1.5x and 4x on this model (at least 3)."""
    f = first_block_share(model_name)
    targets = [1.5] + [lv for lv, _ in levels(steps)] + [4.0]
    out = {math.floor(steps / lv + 1e-9) for lv, _ in levels(steps)}
    out |= {math.floor((steps / lv - steps * f) / (1 - f) + 1e-9) for lv in targets}
    return sorted({p for p in out if 3 <= p < steps}, reverse=True)


# diffusers SeaCache ---------------------------------------------------------------------------------


def _seacache(threshold: float, order: int, max_cached: int, retention: int) -> Method:
    """diffusers' SeaCache (its built-in Wan text-to-video adapter: the spectral indicator is computed from
    the raw latent the transformer is called with, the sigma from the loop's cache context)."""
    knobs = {"threshold": threshold, "residual_order": order, "max_consecutive_cached": max_cached,
             "retention_steps": retention}  # fmt: skip

    def on(m, model, steps, seeds, labels):
        from diffusers import SeaCacheConfig

        model.transformer.enable_cache(SeaCacheConfig(cache_end_steps=1, **knobs))

    label = f"Sea th={threshold:g} o={order} K={max_cached} r={retention}"
    return Method("SeaCache", label, knobs, on, _off_diffusers)


@contextlib.contextmanager
def _quiet_cachedit():
    # cache-dit logs a summary at WARNING on every enable / disable.
    logs = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.startswith("cache_dit")]
    saved = [lg.level for lg in logs]
    for lg in logs:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(logs, saved):
            lg.setLevel(lv)


# -- the sweeps -------------------------------------------------------------------------------------


def _unsupported(family: str) -> set:
    """Groups that cannot run on a family (see the module table)."""
    out = {"TaylorSeer (lite)"} if family == "dit" else set()
    if family != "wan":
        out.add("SeaCache")
    return out


def peer_methods(model_name: str, steps: int, quick: bool = False) -> list:
    """The knob sweeps of every peer group that runs on ``model_name`` (see the module table).

    Grids aim at compute shares from about 0.9 to 0.25 of full at 20 and 50 steps; warm-up lengths
    scale with ``steps``. ``quick``: two points per group. The step-scheduled groups (TaylorSeer) reach
    the same shares on any weights (whole-block / lite: 0.80 .. 0.25; per-module only caches attention, so
    it stays above ~0.8 on FLUX, ~0.75 on DiT, ~0.6 on Wan). The threshold-driven ones (FirstBlockCache,
    MagCache, DBCache) depend on the weights: on the random ``zoo.build`` models FLUX skipped nothing with
    FBC / DBCache thresholds below 0.3-0.5, so the grids reach far up; re-check them on the trained models."""
    from tcpade import zoo

    family = zoo.SPECS[model_name].family
    w = lambda frac: max(1, round(frac * steps))  # noqa: E731  a warm-up given as a fraction of the run

    methods = []
    fbc = [0.03, 0.06, 0.1, 0.2, 0.3, 0.5, 0.8]
    methods += [_fbc(t) for t in (fbc[1::4] if quick else fbc)]

    # (3, 1, 0.1) and (4, 1, 0.1) give, at 20 steps, the evenly spaced schedules that were the best
    # fixed schedules for every predictor in the lead's experiments: 0,1,3,6,..,18 and 0,1,3,7,..,19
    ts_grid = [(2, 1, w(0.6)), (2, 1, w(0.3)), (3, 1, w(0.15)), (3, 2, w(0.15)), (3, 1, w(0.1)), (4, 1, w(0.15)),
               (4, 1, w(0.1)), (5, 2, w(0.15)), (6, 1, w(0.1))]  # fmt: skip
    # Short warm-ups at every step count (diffusers computes step k when k < w or (k - w - 1) % N == 0:
    # warm-up 1, every 3rd computes 0 2 5 8 .. and reaches 2.86x at 20 steps, 2.94x at 50; warm-up 2,
    # every 3rd 0 1 3 6 ..: 2.5x at 20, 2.78x at 50): the strongest TaylorSeer settings measured at
    # 20 and 50 steps, which the warm-ups scaled with the run miss there.
    short = [(2, 1, 1), (3, 1, 1), (3, 1, 2), (4, 1, 1), (4, 1, 2), (5, 1, 1)]
    for mode in ("per-module", "whole-block", "lite"):
        if f"TaylorSeer ({mode})" in _unsupported(family):
            continue
        grid = [ts_grid[1], ts_grid[4]] if quick else ts_grid
        if mode != "per-module" and not quick:  # (per-module caches attention only: no short-warm-up points)
            grid = grid + [g for g in short if g not in grid]
        methods += [_taylorseer(mode, family, *g) for g in grid]

    mag = [(0.003, 2, 0.2), (0.01, 2, 0.2), (0.03, 2, 0.2), (0.06, 3, 0.2), (0.1, 3, 0.2), (0.2, 4, 0.1),
           (0.5, 6, 0.1)]  # fmt: skip
    methods += [_magcache(*g) for g in ([mag[2], mag[5]] if quick else mag)]

    # (threshold, warm-up, max continuous cached steps); the capped points force periodic refreshes.
    db = [(0.04, w(0.3), -1), (0.08, w(0.2), -1), (0.15, w(0.15), -1), (0.3, w(0.1), 5), (0.5, w(0.1), 3),
          (0.8, w(0.1), -1)]  # fmt: skip
    pick = (lambda g: [g[1], g[4]]) if quick else (lambda g: g)
    methods += [_dbcache(th, 1, 0, wu, mc, None) for th, wu, mc in pick(db)]
    # + TaylorSeer: first order over the whole grid, second order at two of its aggressive points. cache-dit's
    # calibrator forms a derivative only from the third computed step on (current_step > 1), so with
    # fewer warm-up steps and nothing computed after them it degenerates to plain reuse: warm-up >= 3.
    db_ts = [(th, max(wu, 3), mc, 1) for th, wu, mc in db] + [(th, max(wu, 3), mc, 2) for th, wu, mc in (db[3], db[4])]
    methods += [_dbcache(th, 1, 0, wu, mc, ("taylorseer", o)) for th, wu, mc, o in pick(db_ts)]
    # + DMD (exponential / Prony forecast of the cached residual; it engages once 4 evenly spaced computed
    # steps are in its window, before that it is a first-order Taylor forecast): cache-dit's default window
    # of 6 over the whole grid, the shortest window it fits with (4) at two aggressive points.
    db_dmd = [(th, max(wu, 3), mc, 6) for th, wu, mc in db] + [(th, max(wu, 3), mc, 4) for th, wu, mc in (db[3], db[4])]
    methods += [_dbcache(th, 1, 0, wu, mc, ("dmd", h)) for th, wu, mc, h in pick(db_dmd)]
    # + FoCa (BDF2 predictor, Heun corrector; it has no knobs of its own).
    methods += [_dbcache(th, 1, 0, max(wu, 2), mc, ("foca",)) for th, wu, mc in pick(db)]

    # cache-dit's fixed step mask: evenly spaced masks at the pass counts the benchmark compares at (and a
    # lighter and a heavier one), the whole stack skipped on the masked steps, with each calibrator.
    counts = mask_pass_counts(model_name, steps)
    counts = sorted({counts[len(counts) // 3], counts[-1]}, reverse=True) if quick else counts
    for cal in MASK_CALIBRATORS:
        methods += [cachedit_mask(evenly_spaced_mask(steps, p, min(2, p - 1)), cal) for p in counts]

    if "SeaCache" not in _unsupported(family):
        # (threshold, residual order, max consecutive cached, retention steps); order 1 is SeaCache's default.
        sea = [(0.05, 1, 2, 1), (0.1, 1, 2, 1), (0.2, 1, 2, 1), (0.3, 1, 3, 1), (0.5, 1, 3, 1), (0.8, 1, 4, 1),
               (0.3, 0, 3, 1), (0.5, 0, 4, 2)]  # fmt: skip
        methods += [_seacache(*g) for g in ([sea[2], sea[5]] if quick else sea)]
    return methods


MASK_CALIBRATORS = (None, ("taylorseer", 1), ("dmd", 6), ("foca",))


def level_passes(steps: int) -> list:
    """The block-stack passes per branch at each speedup level of :data:`LEVELS` (rounded down)."""
    return [math.floor(steps / lv + 1e-9) for lv, _ in levels(steps)]


def levels(steps: int) -> list:
    """The speedup levels (MACs) the benchmark compares at: 2x, 2.5x and 2.9x (7 of 20 passes); at 50 steps
    and more also 3x and 4x."""
    out = [(2.0, "2x"), (2.5, "2.5x"), (20 / 7, "2.9x")]
    if steps >= 50:
        out += [(3.0, "3x"), (4.0, "4x")]
    return out


