"""Without the C++ extension, CPU tensors use the torch reference, with one warning."""

import os
import subprocess
import sys

SCRIPT = r"""
import warnings
import torch
from tcpade import ops
from tcpade import coef as K
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    h = torch.randn(1, 5, 16)
    ring = torch.randn(3, 1, 5, 16)
    slots = torch.tensor([0, 1, 2], dtype=torch.int32)
    for _ in range(3):
        ops.update(h, h + 1, ring, slots, None, False)
        cf = K.coef_tensor(K.build_coef("paper", "middle", [0.5, 0.6, 0.7], 0.4, 3, 3), "cpu")
        ops.predict(h, ring, slots, cf, None, "paper", False, True)
msgs = [str(w.message) for w in caught if "tcpade" in str(w.message)]
print("BACKENDS", ops.available_backends("cpu"))
print("WARNINGS", len(msgs), msgs)
"""


def test_no_native_falls_back_with_one_warning():
    env = dict(os.environ, TCPADE_NO_NATIVE="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "BACKENDS ['torch']" in proc.stdout
    assert "WARNINGS 1 " in proc.stdout and "torch reference" in proc.stdout
