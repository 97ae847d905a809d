"""Triton kernels of tcpade (installed as tcpade.kernels).

Set TRITON_INTERPRET=1 before importing this package to run them on CPU tensors.
"""

from .predict import predict
from .update import update

__all__ = ["predict", "update"]
