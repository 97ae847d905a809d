"""The one progress bar of tcpade: ``tcpade.sample``'s denoising loop and every tool (the
``tcpade`` command, bench, demo, calibrate) draw it. Plain Python: it imports neither torch
nor diffusers, so ``tcpade --help`` stays instant."""

from __future__ import annotations

import sys
import time


class Progress:
    """A one-line progress bar, redrawn in place on ``stream`` (default stdout); silent when the
    stream is not a terminal (unless ``enabled=True``), so logs and pipes get only the results.
    ``enabled=False``: silent."""

    def __init__(self, total: int, label: str, enabled=None, width: int = 24, stream=None):
        self.stream = stream or sys.stdout
        self.total, self.label, self.width, self.done = total, label, width, 0
        self.enabled = self.stream.isatty() if enabled is None else bool(enabled)
        self.t0 = time.perf_counter()
        self._draw("")

    def _draw(self, what: str):
        if not self.enabled:
            return
        n = round(self.width * self.done / max(1, self.total))
        bar = "#" * n + "-" * (self.width - n)
        elapsed = time.perf_counter() - self.t0
        self.stream.write(f"\r{self.label} [{bar}] {self.done}/{self.total} {elapsed:5.1f}s {what:<24s}")
        self.stream.flush()

    def step(self, what: str = ""):
        self.done += 1
        self._draw(what)

    def close(self):
        if self.enabled:
            self.stream.write("\r" + " " * (len(self.label) + self.width + 42) + "\r")
            self.stream.flush()
