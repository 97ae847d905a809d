"""integrations: tcpade inside diffusers models, pipelines and denoising loops.

Owns the per-family tables (``families``: which block lists form the stack, where ``h_in`` and
``h_out`` are), the block hooks on diffusers' own hook registry (``adapters``), the public
``apply`` / ``remove`` / ``summary`` / ``runtime`` (``api``), the custom denoising loop
(``sampling``) and the agreement of ranks under context parallelism (``distributed``).

May import: ``tcpade.core``, ``tcpade.policy``, itself, torch and diffusers. Never ``tools``.
"""
