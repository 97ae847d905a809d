"""policy: which steps run and which predictor fills the others.

Owns the user's knobs (``config``: :class:`TCPadeConfig` and its presets), the fixed plans
(``schedules``: the spaced rule, budgets, calibrated schedules and their registry) and the
per-step decision (``runtime``: :class:`Runtime`, one per transformer, with one state per
CFG branch). A decision depends on the step, the config and the sums of earlier writes,
never on the tensors of the call being decided.

May import: ``tcpade.core`` and itself. Never ``integrations`` or ``tools``, never diffusers.
"""
