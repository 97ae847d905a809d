"""tools: what is built on the library rather than part of it.

Owns the schedule search (``calibrate``), the quality/speed benchmark (``bench``), the demo
(``demo``, built on ``bench``), the ``tcpade`` command (``cli``, which imports the subcommand
modules; they share ``args``: argument checks, usage errors, the progress bar), the model
runner ``bench`` and ``calibrate`` share (``runner``), image metrics (``metrics``) and the tiny
random-weight models the tests and benchmarks run on (``tiny``). The trained models live in
``tcpade.zoo``, which belongs to this layer (it keeps its short public name).

May import: every layer below (``core``, ``policy``, ``integrations``), ``tcpade.zoo``, itself.
Nothing in the layers below imports from here.
"""
