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
def count_macs(transformer: nn.Module):
    """Counts the multiply-accumulates of every ``nn.Linear`` inside the block lists that really ran.

    Plain torch forward hooks on the Linear modules: they fire inside ``Module.__call__`` whatever
    diffusers' HookRegistry or cache-dit did to ``forward`` of the modules above them, and a skipped
    block never calls its Linears, so skipped work is not counted. A Linear counts only while a block
    is running (pre/post hooks on the blocks), so a block's submodule reused outside the stack does not.
    The result is ``.macs`` (and ``.calls``, the Linear forwards counted)."""
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
        for block in blocks:
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
    _diffusers_disable(model.transformer)


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


def _dbcache(threshold: float, fn: int, bn: int, warmup: int, max_cont: int, order: Optional[int]) -> Method:
    knobs = {"residual_diff_threshold": threshold, "Fn_compute_blocks": fn, "Bn_compute_blocks": bn,
             "max_warmup_steps": warmup, "max_continuous_cached_steps": max_cont}  # fmt: skip
    if order:
        knobs["taylorseer_order"] = order

    def on(m, model, steps, seeds, labels):
        import cache_dit
        from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig

        t = model.transformer
        m.info["added_attrs"] = [a for a in _PATCHED_ATTRS if a not in t.__dict__ and a not in t._modules]
        m.info["module_order"] = list(t._modules)
        cfg = DBCacheConfig(
            Fn_compute_blocks=fn, Bn_compute_blocks=bn, residual_diff_threshold=threshold,
            max_warmup_steps=warmup, max_continuous_cached_steps=max_cont, num_inference_steps=steps,
            enable_separate_cfg=model.spec.guidance_scale != 1,
        )  # fmt: skip
        cal = TaylorSeerCalibratorConfig(taylorseer_order=order) if order else None
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

    group = "cache-dit DBCache+TaylorSeer" if order else "cache-dit DBCache"
    label = f"DB F{fn}B{bn} th={threshold:g} w={warmup} mc={max_cont}" + (f" TS{order}" if order else "")
    return Method(group, label, knobs, on, off)


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
    return {"TaylorSeer (lite)"} if family == "dit" else set()


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
    for mode in ("per-module", "whole-block", "lite"):
        if f"TaylorSeer ({mode})" in _unsupported(family):
            continue
        grid = [ts_grid[1], ts_grid[4]] if quick else ts_grid
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
    methods += [_dbcache(th, 1, 0, wu, mc, o) for th, wu, mc, o in pick(db_ts)]
    return methods
