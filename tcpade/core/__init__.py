"""core: the math and the device code, knowing nothing of models, configs or diffusers.

Owns the tables every backend shares (``layout``: the sums, the variants, the stages, also
written out as the C++ header), the per-step scalars (``coef``: Pade coefficients, the
extrapolation weights), the float64-capable reference of every op (``reference``), the
``torch.ops.tcpade`` custom ops and their backend dispatch (``ops``: Triton from
``tcpade.kernels`` on CUDA or under the interpreter, C++ from ``tcpade._C`` on CPU, the torch
reference otherwise) and the per-branch residual ring with its device-side sums
(``history``).

May import: torch, numpy, ``tcpade.kernels``, ``tcpade._C``, and itself. Nothing above it
(``policy``, ``integrations``, ``tools``) and never diffusers.
"""
