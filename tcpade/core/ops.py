"""The tcpade custom ops (torch.library) and their backend dispatch.

Two ops, one per hot path:

* ``torch.ops.tcpade.update(h_in, h_out, ring, slots, h_prev, probe) -> sums``
* ``torch.ops.tcpade.predict(h_in, ring, slots, coef, h_prev, variant, store, write_out)
  -> (h_out, sums)``

``h_in=None`` is a zero input (the output level, where the transformer's output is its own
residual): the numbers of an all-zero ``h_in``, with no zero tensor allocated or read
(a constexpr in the Triton kernels, a null pointer in C++, the scalar 0 in the reference).

Semantics are those of :mod:`tcpade.core.reference`. Both mutate ``ring`` (and ``h_prev``)
in place, as declared in their schemas, and have fake implementations so they trace
under ``torch.compile(fullgraph=True)`` without a graph break.

Dispatch by device: CUDA tensors -> the Triton kernels; CPU tensors -> the C++ extension
(``tcpade._C``), or the torch reference when the extension is absent (one warning).
``use_backend("triton")`` forces the Triton kernels on CPU tensors; that needs
TRITON_INTERPRET=1 set before triton is first imported (tests do this in conftest).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from typing import Optional, Tuple

import torch

from . import coef as K
from . import reference
from .layout import NSUMS

log = logging.getLogger(__name__)

STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
BACKENDS = ("auto", "triton", "cpp", "torch")

_state = threading.local()
_native = None
_native_checked = False


def _load_native():
    """The C++ extension, or None (with one warning saying why)."""
    global _native, _native_checked
    if not _native_checked:
        _native_checked = True
        if os.environ.get("TCPADE_NO_NATIVE", "0") == "1":
            warnings.warn("TCPADE_NO_NATIVE=1: tcpade uses the torch reference on CPU", stacklevel=3)
        else:
            try:
                from .. import _C

                _native = _C
            except ImportError as exc:
                warnings.warn(
                    f"tcpade's C++ extension is not available ({exc}); CPU tensors use the slower "
                    "torch reference. Reinstall with a C++ compiler to build it.",
                    stacklevel=3,
                )
    return _native


def native_available() -> bool:
    return _load_native() is not None


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def current_backend() -> str:
    return getattr(_state, "backend", None) or os.environ.get("TCPADE_BACKEND", "auto")


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend for CPU tensors in this thread ("auto", "triton", "cpp", "torch")."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    old = getattr(_state, "backend", None)
    _state.backend = name
    try:
        yield
    finally:
        _state.backend = old


def available_backends(device: str = "cpu") -> list:
    """Backends that can run on tensors of ``device`` in this process."""
    if device == "cuda":
        return ["triton"] if triton_available() and torch.cuda.is_available() else []
    out = ["torch"]
    if native_available():
        out.append("cpp")
    if triton_available() and os.environ.get("TRITON_INTERPRET", "0") == "1":
        out.append("triton")
    return out


def _resolve(t: torch.Tensor) -> str:
    want = current_backend()
    if want not in BACKENDS:
        raise ValueError(f"TCPADE_BACKEND must be one of {BACKENDS}, got {want!r}")
    if t.device.type == "cuda":
        if want in ("cpp",):
            raise ValueError("the C++ backend runs on CPU tensors only; got CUDA tensors")
        if want == "torch":
            return "torch"
        if not triton_available():
            raise RuntimeError("CUDA tensors need triton >= 3.6 (pip install triton)")
        return "triton"
    if t.device.type != "cpu":
        return "torch"
    if want == "triton":
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError(
                "the Triton backend on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
            )
        return "triton"
    if want == "torch":
        return "torch"
    if _load_native() is not None:
        return "cpp"
    if want == "cpp":
        raise RuntimeError("the C++ backend was requested but tcpade._C is not built")
    return "torch"


# ---------------------------------------------------------------------------- checks


def _check_h(name: str, t: torch.Tensor) -> None:
    if t.dtype not in STORAGE_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if t.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dims (..., tokens, channels), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")


def _check_like(name: str, t: torch.Tensor, ref: torch.Tensor, shape, contiguous: bool, ref_name="h_in") -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}: move them to one device")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}: they must match")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (it is a tcpade state buffer written in place)")


def _check_state(h_in, ring, slots, h_prev, name: str = "h_in") -> None:
    """Check the history state against ``h_in``, the tensor named ``name`` that has its shape
    (h_out for an update with h_in=None; None for a prediction with h_in=None: the ring itself)."""
    if h_in is None:
        if ring.dim() < 3 or ring.shape[0] < 3:
            raise ValueError(f"with h_in=None, ring must have shape (S >= 3, ..., tokens, channels), got "
                             f"{tuple(ring.shape)}")  # fmt: skip
        _check_h("ring", ring)
        if not ring.is_contiguous():
            raise ValueError("ring must be contiguous (it is a tcpade state buffer written in place)")
        h_in, name = ring[0], "ring"
    else:
        _check_h(name, h_in)
    if ring.dim() != h_in.dim() + 1 or ring.shape[0] < 3:
        raise ValueError(f"ring must have shape (S >= 3, {', '.join(map(str, h_in.shape))}), got {tuple(ring.shape)}")
    _check_like("ring", ring, h_in, (ring.shape[0], *h_in.shape), True, name)
    if slots.dtype not in (torch.int32, torch.int64) or tuple(slots.shape) != (ring.shape[0],):
        raise ValueError(
            f"slots must be an int32/int64 tensor of shape ({ring.shape[0]},), got {slots.dtype} {tuple(slots.shape)}"
        )
    if slots.device != h_in.device:
        raise ValueError(f"slots is on {slots.device} but {name} is on {h_in.device}")
    if h_prev is not None:
        _check_like("h_prev", h_prev, h_in, h_in.shape, True, name)


def _check_slot_values(slots: torch.Tensor, nslot: int) -> list:
    vals = [int(v) for v in slots.tolist()]
    if sorted(vals) != list(range(nslot)):
        raise ValueError(f"slots must be a permutation of 0..{nslot - 1}, got {vals}")
    return vals


# ------------------------------------------------------------------------------ update


@torch.library.custom_op("tcpade::update", mutates_args=("ring", "h_prev"))
def update(
    h_in: Optional[torch.Tensor],
    h_out: torch.Tensor,
    ring: torch.Tensor,
    slots: torch.Tensor,
    h_prev: Optional[torch.Tensor],
    probe: bool,
) -> torch.Tensor:
    """Write R = h_out - h_in into the write slot; return the fp32 sums (``tcpade.core.layout.SUMS``).
    ``h_in=None``: a zero input, R = h_out (h_prev, if given, is zeroed).

    Semantics: ``tcpade.core.reference.update``."""
    _check_update(h_in, h_out, ring, slots, h_prev)
    return _update_impl(h_in, h_out, ring, slots, h_prev, probe, None)


def _update_impl(h_in, h_out, ring, slots, h_prev, probe, vals) -> torch.Tensor:
    """``update`` after its checks. ``vals``: the host values of ``slots`` (a checked permutation), or
    None to read and check them here (CPU tensors)."""
    h_in = h_in.contiguous() if h_in is not None else None
    h_out = h_out.contiguous()
    backend = _resolve(h_out)
    if backend == "triton":
        from .. import kernels

        return kernels.update(h_in, h_out, ring, slots, h_prev, probe)
    if vals is None and slots.device.type == "cpu":
        vals = _check_slot_values(slots, ring.shape[0])
    if backend == "cpp":
        sums = _native.update(
            h_in.data_ptr() if h_in is not None else 0,  # 0: a zero input, not read
            h_out.data_ptr(),
            ring.data_ptr(),
            vals,
            h_prev.data_ptr() if h_prev is not None else 0,
            h_out.numel() // h_out.shape[-1],
            h_out.shape[-1],
            ring.shape[0],
            _DTYPE_CODE[h_out.dtype],
            bool(probe),
        )
        return torch.tensor(sums, dtype=torch.float32, device=h_out.device)
    return reference.update(h_in, h_out, ring, slots, h_prev, probe).to(device=h_out.device)


def _check_update(h_in, h_out, ring, slots, h_prev):
    if h_in is None:
        _check_state(h_out, ring, slots, h_prev, "h_out")
    else:
        _check_state(h_in, ring, slots, h_prev)
        _check_like("h_out", h_out, h_in, h_in.shape, False)


@update.register_fake
def _update_fake(h_in, h_out, ring, slots, h_prev, probe):
    _check_update(h_in, h_out, ring, slots, h_prev)
    return h_out.new_empty(NSUMS, dtype=torch.float32)


# ----------------------------------------------------------------------------- predict


def _check_predict(h_in, ring, slots, coef, h_prev, variant):
    _check_state(h_in, ring, slots, h_prev)
    _check_coef(coef, ring, variant)


def _check_coef(coef, ring, variant):
    K.check_variant(variant)
    if coef.dtype != torch.float32 or tuple(coef.shape) != (K.NCOEF,):
        raise ValueError(f"coef must be a float32 tensor of shape ({K.NCOEF},), got {coef.dtype} {tuple(coef.shape)}")
    if coef.device != ring.device:
        raise ValueError(f"coef is on {coef.device} but the ring is on {ring.device}")


@torch.library.custom_op("tcpade::predict", mutates_args=("ring", "h_prev"))
def predict(
    h_in: Optional[torch.Tensor],
    ring: torch.Tensor,
    slots: torch.Tensor,
    coef: torch.Tensor,
    h_prev: Optional[torch.Tensor],
    variant: str,
    store: bool,
    write_out: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """h_out = h_in + R_eff for a skipped step; returns (h_out or an empty tensor, sums).

    Every non-finite element of h_out is replaced on the device by h_in + R1 (R1 the newest
    stored residual, ring slot ``slots[0]``, where finite; 0 where not), and the ``nonfinite`` sum counts the raw
    predictions that were not finite: the host learns of a fallback from the sums after
    the run, and never has to wait for them to keep h_out finite. A stored or probed
    prediction (``store``) is written as predicted and counted the same way. ``h_in=None``: a
    zero input, h_out = R_eff (shape and dtype of a ring slot). All other semantics:
    ``tcpade.core.reference.predict``."""
    _check_predict(h_in, ring, slots, coef, h_prev, variant)
    return _predict_impl(h_in, ring, slots, coef, h_prev, variant, store, write_out, None)


def _predict_impl(h_in, ring, slots, coef, h_prev, variant, store, write_out, vals):
    """``predict`` after its checks; ``vals`` as in ``_update_impl``."""
    h_in = h_in.contiguous() if h_in is not None else None
    backend = _resolve(ring)
    if backend == "triton":
        from .. import kernels

        return kernels.predict(h_in, ring, slots, coef, h_prev, variant, store, write_out)
    if vals is None and slots.device.type == "cpu":
        vals = _check_slot_values(slots, ring.shape[0])
    if backend == "cpp":
        out = _new_out(h_in, ring, write_out)
        n, c = ring.numel() // ring.shape[0], ring.shape[-1]
        sums = _native.predict(
            h_in.data_ptr() if h_in is not None else 0,  # 0: a zero input, not read
            ring.data_ptr(),
            vals,
            coef.tolist(),
            h_prev.data_ptr() if h_prev is not None else 0,
            out.data_ptr() if write_out else 0,
            n // c,
            c,
            ring.shape[0],
            _DTYPE_CODE[ring.dtype],
            K.check_variant(variant),
            bool(store),
        )
        return out, torch.tensor(sums, dtype=torch.float32)
    out, sums = reference.predict(h_in, ring, slots, coef, h_prev, variant, store, write_out)
    return out, sums.to(device=ring.device)


def _new_out(h_in: Optional[torch.Tensor], ring: torch.Tensor, write_out: bool) -> torch.Tensor:
    """The h_out buffer of a prediction (a ring slot's shape and dtype), or an empty tensor."""
    if not write_out:
        return ring.new_empty(0)
    return ring.new_empty(ring.shape[1:] if h_in is None else h_in.shape)


@predict.register_fake
def _predict_fake(h_in, ring, slots, coef, h_prev, variant, store, write_out):
    _check_predict(h_in, ring, slots, coef, h_prev, variant)
    return _new_out(h_in, ring, write_out), ring.new_empty(NSUMS, dtype=torch.float32)


# ------------------------------------------------------------------------- eager calls
#
# torch's custom-op dispatch (schema binding, autograd and ADInplaceOrView keys, the Python
# kernel's redispatch) costs about as much host time as the CPU kernels themselves on small
# tensors, once per transformer call. An eager caller on plain tensors may run the
# implementation directly: the same checks, errors and numbers, without the dispatch.


def direct(*tensors) -> bool:
    """May a call of the ops on these tensors (None allowed) run directly (``update_direct``,
    ``predict_direct``)? Only an eager call: not while torch.compile traces (the graph needs the
    custom op), not under a torch dispatch or function mode (fake tensors, functionalization,
    ``with torch.device(...)``) or a functorch transform, not on a tensor subclass, and not where
    autograd would see a tensor that requires grad. Otherwise call the op."""
    if torch.compiler.is_compiling():  # first: dynamo folds it and never traces the rest
        return False
    if (torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
            or torch._C._functorch.peek_interpreter_stack() is not None):  # fmt: skip
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) is not torch.Tensor or (grad and t.requires_grad)):
            return False
    return True


def update_direct(h_in, h_out, ring, slots, h_prev, probe: bool, vals: Optional[list] = None) -> torch.Tensor:
    """``update`` without the custom-op dispatch, where ``direct`` holds.

    ``vals``: None, or the host values of ``slots`` from a caller that keeps the state itself
    (``tcpade.core.history.History``): the state (``ring`` allocated like h_in, or like h_out for
    ``h_in=None``; ``slots``; ``h_prev``) has passed these checks in an earlier call and is
    unchanged, so only h_out is checked against h_in."""
    if vals is None:
        _check_update(h_in, h_out, ring, slots, h_prev)
    elif h_in is not None:
        _check_like("h_out", h_out, h_in, h_in.shape, False)
    return _update_impl(h_in, h_out, ring, slots, h_prev, probe, vals)


def predict_direct(h_in, ring, slots, coef, h_prev, variant: str, store: bool, write_out: bool,
                   vals: Optional[list] = None):  # fmt: skip
    """``predict`` without the custom-op dispatch, where ``direct`` holds; ``vals`` as in
    ``update_direct`` (then only ``coef`` and ``variant`` are checked)."""
    if vals is None:
        _check_predict(h_in, ring, slots, coef, h_prev, variant)
    else:
        _check_coef(coef, ring, variant)
    return _predict_impl(h_in, ring, slots, coef, h_prev, variant, store, write_out, vals)
