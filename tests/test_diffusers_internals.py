"""The diffusers internals tcpade's hooks rely on, each checked by name.

tcpade uses diffusers' public hook API (``HookRegistry``, ``ModelHook``, ``StateManager``,
``CacheContext``, ``TransformerBlockRegistry.get``) and, where diffusers offers no public
way, five private names; a note at each use says why. When a diffusers release renames or
changes one of them, the test here fails with a message naming it, before a model test
fails somewhere obscure.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook

from tcpade.integrations import adapters, families


def _need(cond: bool, internal: str, what: str) -> None:
    if not cond:
        pytest.fail(f"diffusers internal {internal} changed: {what}. tcpade's hooks need it "
                    "(tcpade/integrations/adapters.py, families.py); adapt them to this release.")  # fmt: skip


def test_transformer_block_registry():
    """``diffusers.hooks._helpers.TransformerBlockRegistry`` (a private module): ``get`` returns
    the metadata of a registered block class and raises ValueError for any other."""
    try:
        helpers = importlib.import_module("diffusers.hooks._helpers")
    except ImportError:
        pytest.fail("diffusers internal diffusers.hooks._helpers is gone (tcpade reads TransformerBlockRegistry)")
    reg = getattr(helpers, "TransformerBlockRegistry", None)
    _need(reg is not None and callable(getattr(reg, "get", None)), "diffusers.hooks._helpers.TransformerBlockRegistry",
          "it has no classmethod get")  # fmt: skip
    from diffusers.models.transformers.transformer_flux import FluxTransformerBlock

    meta = reg.get(FluxTransformerBlock)
    for name in ("return_hidden_states_index", "return_encoder_hidden_states_index", "hidden_states_argument_name",
                 "encoder_hidden_states_argument_name"):  # fmt: skip
        _need(hasattr(meta, name), "TransformerBlockMetadata", f"it has no field {name}")
    try:
        reg.get(torch.nn.Linear)
    except ValueError:
        pass
    else:
        pytest.fail("diffusers internal TransformerBlockRegistry.get no longer raises ValueError for an "
                    "unregistered class (tcpade.integrations.families.registry_block catches it)")  # fmt: skip
    assert families.registry_block(torch.nn.Linear) is None
    assert families.registry_block(FluxTransformerBlock) is not None


def test_hook_registry_attribute():
    """A module's HookRegistry lives in its ``_diffusers_hook`` attribute (tcpade asks for it without
    creating one, and deletes it on detach where attach created it)."""
    m = torch.nn.Linear(2, 2)
    registry = HookRegistry.check_if_exists_or_initialize(m)
    _need(getattr(m, adapters._REGISTRY_ATTR, None) is registry, f"torch.nn.Module.{adapters._REGISTRY_ATTR}",
          "HookRegistry.check_if_exists_or_initialize no longer stores the registry there")  # fmt: skip
    _need(isinstance(registry.hooks, dict), "HookRegistry.hooks", "it is not a dict of hooks by name")
    assert adapters._registry_of(torch.nn.Linear(2, 2)) is None


def test_stateful_flag_reaches_the_state_manager():
    """``ModelHook._is_stateful``: the hooks that set it get the cache context and the resets."""
    _need(hasattr(ModelHook, "_is_stateful"), "ModelHook._is_stateful", "the attribute is gone")
    from diffusers.hooks.hooks import BaseState, StateManager

    class _State(BaseState):
        def reset(self, *args, **kwargs):
            pass

    class _Hook(ModelHook):
        _is_stateful = True

        def __init__(self):
            super().__init__()
            self.state_manager = StateManager(_State)
            self.resets = 0

        def reset_state(self, module):
            self.resets += 1
            return module

    m = torch.nn.Linear(2, 2)
    hook = _Hook()
    HookRegistry.check_if_exists_or_initialize(m).register_hook(hook, "h")
    from diffusers.hooks.hooks import CacheContext, _set_cache_context  # what CacheMixin.cache_context calls

    _set_cache_context(m, CacheContext("cond"))
    _need(hook.state_manager.context.name == "cond", "ModelHook._is_stateful",
          "a stateful hook's StateManager no longer receives the cache context")  # fmt: skip
    adapters._registry_of(m).reset_stateful_hooks()
    _need(hook.resets == 1, "ModelHook._is_stateful", "reset_stateful_hooks no longer resets a stateful hook")


def test_context_parallel_split_hook_class():
    """attach refuses blocks whose inputs diffusers' context parallelism splits: it looks for a
    ``ContextParallelSplitHook`` in the block's registry (by class, not by hook name)."""
    try:
        from diffusers.hooks.context_parallel import ContextParallelSplitHook, apply_context_parallel
    except ImportError as exc:
        pytest.fail(f"diffusers internal diffusers.hooks.context_parallel.ContextParallelSplitHook is gone ({exc})")
    import inspect

    src = inspect.getsource(apply_context_parallel)
    _need("ContextParallelSplitHook(" in src and "register_hook" in src,
          "diffusers.hooks.context_parallel.apply_context_parallel",
          "it no longer registers a ContextParallelSplitHook on the modules whose inputs it splits")  # fmt: skip
    assert adapters.ContextParallelSplitHook is ContextParallelSplitHook


def test_set_cache_context():
    """``diffusers.hooks.hooks._set_cache_context(module, context)`` (what ``CacheMixin.cache_context``
    calls): tcpade's ``adapters.cache_context`` calls it on models without the mixin, so that a
    diffusers cache on the same model also gets the context. It sets the context of every
    stateful hook's StateManager under the module, and clears it with None."""
    hooks = importlib.import_module("diffusers.hooks.hooks")
    fn = getattr(hooks, "_set_cache_context", None)
    _need(callable(fn), "diffusers.hooks.hooks._set_cache_context", "it is gone")
    from diffusers.hooks.hooks import BaseState, CacheContext, StateManager

    class _Hook(ModelHook):
        _is_stateful = True

        def __init__(self):
            super().__init__()
            self.state_manager = StateManager(BaseState)

    module = torch.nn.Linear(2, 2)
    hook = _Hook()
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, "probe")
    fn(module, CacheContext("cond"))
    _need(hook.state_manager._context is not None and hook.state_manager._context.name == "cond",
          "diffusers.hooks.hooks._set_cache_context", "it no longer sets a stateful hook's context")  # fmt: skip
    fn(module, None)
    _need(hook.state_manager._context is None, "diffusers.hooks.hooks._set_cache_context", "None no longer clears it")
