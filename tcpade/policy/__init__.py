"""policy: which steps run and which predictor fills the others.

Owns, one job per module:

* ``config``: the user's knobs (:class:`TCPadeConfig`, its presets, its one validation table);
* ``schedules``: the spaced rule, budgets, calibrated schedules and their registry;
* ``plan``: ``Resolved``, the user's config beside what calibration resolved for a model
  (predictor, calibrated schedules), and the fixed plans;
* ``rule``: ``Rule.reason(k, T, state)``, the host rule, for the plans and the live decision;
* ``clock``: T of the run and the call's time;
* ``reader``: the device sums to the host, only where asked;
* ``choosers``: the error policy's run of skips and the "auto" predictor's candidate;
* ``state``: the per-branch, per-thread state and the step records;
* ``runtime``: :class:`Runtime`, one per transformer, which puts them together per call.

A decision depends on the step, the config and the sums of earlier writes, never on the
tensors of the call being decided.

May import: ``tcpade.core`` and itself. Never ``integrations`` or ``tools``, never diffusers.
"""
