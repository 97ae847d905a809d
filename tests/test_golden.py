"""Golden decisions and outputs of the presets, held on every x86 CPU.

The cases: every preset (``TCPadeConfig.slow/fast/paper/adaptive``; ``rule-slow`` /
``rule-fast`` are the TSI rules that slow() and fast() were before they became compute
budgets, kept as cases of the runtime's math) at 20 steps, on the three trained zoo models
(two samples each, with the zoo's own guidance) and on the tiny random-weight FLUX pipeline
with true classifier-free guidance (separate cond / uncond calls). ``tests/golden/presets.json``
holds per case and branch the decisions and the floats, a fingerprint of the output, and the
case's measured sensitivity to rounding (``amp``, below).

What is compared exactly: the decisions, i.e. per branch the computed steps, each call's
reason, the steps with non-finite values, and which calls have a TSI / a probe error (their
None pattern). These are the part that must never differ between machines, and it is the
only exact part: the floats below are not bit-reproducible across CPUs (an AMD EPYC and an
Intel Xeon differ from the 7th significant digit on), because the transformer's float32
matmuls (MKL / oneDNN), its softmax and norm reductions and its vectorised exp/erf sum in
an order chosen by the instruction set (ATEN_CPU_CAPABILITY default / avx2 / avx512, and
MKL's own path per CPU vendor) and by the thread count. A decision reads a float only
against a threshold (the error policy's 0.5 / 1 / 2 x tolerance, a TSI threshold < 1), and
``test_decisions_have_margin`` checks that every recorded value the case's policy reads is
farther from each threshold than the float tolerance, so rounding cannot flip a decision
(the other presets have fixed plans and read no float).

What is compared within a tolerance: the TSI and the probe error of every call, and the
output through its fingerprint ``out``: per sample the means of 16 contiguous blocks, 8
projections on fixed random +-1 vectors divided by N (the sign bits come from Python's
``random.Random(seed).getrandbits``, reproducible everywhere), the sum, the L2 norm, the min
and the max of the float32 output, in float64. The tolerance of a quantity q is derived from
float32 rounding:

1. One matmul. A float32 dot product of K terms, summed in any order and blocking, has
   |fl(y) - y| <= gamma_K * sum_k |x_k w_k| with gamma_K = K u / (1 - K u), u = 2^-24 (the
   standard bound for recursive or blocked summation; FMA only shrinks it): a relative error
   of at most ~K u at the output's scale, ~sqrt(K) u when the roundings have random signs.
   Two CPUs, each within the bound, differ by at most 2 K u. K is the longest inner
   dimension of the model's matmuls, the widest ``nn.Linear`` input (stored as ``k``: 480 on
   flux-digits, the single blocks' projection of attention and MLP together; 384 on
   dit-faces, the MLP's down-projection; 256 on wan-digits, its MLP, and on the tiny FLUX,
   its timestep embedding); the attention's sums (head dim <= 24, <= 100 tokens) and the
   norms' (width <= 96) are shorter. 2 K u = 5.7e-5, 4.6e-5, 3.1e-5 (typical: 2.6e-6 for
   K = 480, with 2 sqrt(K) u).
2. Amplification. Those roundings, in every matmul of every call, propagate through the 20
   denoising steps (x_{k+1} = x_k + dt v, CFG v = v_u + g (v_c - v_u) scales the branch
   difference by up to 2g - 1), through the cache's predictions (extrapolations from residual
   differences, which cancel; the paper's [2/1] Pade divides by 1 - a s and clips to a trust
   region) and through the TSI and error formulas (normalised residual differences). This
   factor depends on the case (in the output's max norm: ~3 on flux-digits, 50-800 on
   dit-faces and wan-digits, 5 * 10^4 for the paper predictor there) and has no useful
   closed form, so it is measured when the file is written: the case is rerun with every
   ``nn.Linear`` output y perturbed by PROBE * rms(y) * xi (xi standard normal, PROBE =
   2^-20 = 16 u, the size of the real rounding differences, where the response is still
   linear), once per seed in PROBE_SEEDS, and A_q = max |q_probe - q| / PROBE over the calls
   or fingerprint entries of q and over the seeds. ``amp`` stores A_q for "tsi", "error",
   "mean" (the block means, the projections, sum / N: averages) and "point" (the output's
   max-norm change, which bounds the change of min, max and rms = L2 / sqrt(N): each is
   1-Lipschitz in the max norm). A_q is floored at the quantity's own scale (nothing is more
   exact than one matmul's rounding at its own size). A probe run whose decisions differ from
   the unperturbed run means the case sits on a threshold: ``--write`` refuses it.
3. Tolerance: tol_q = 2 K u A_q, the worst-case difference of one matmul between two CPUs
   pushed through the case's measured amplification. The sum is compared as sum / N and the
   L2 norm as rms, in their groups' tolerances. On 22 of the 24 cases this holds the TSI to
   3e-5..3e-4 (the paper predictor: 1.5e-3, 1e-2), the probe error to 5e-5..9e-5, the
   output's averages to 6e-5..1.1e-3 and its min / max / rms to 1.2e-4..2.5e-2 (outputs in
   [-1, 1]; the tiny FLUX's up to 4.8). The paper predictor on dit-faces and wan-digits turns
   one rounding into a max-norm change 5 * 10^4 times larger, so there the min / max / rms
   tolerance (2.3, 1.4) says nothing, the averages are held to 8e-2 / 1.5e-2 and the TSI to
   4e-2 / 1e-2: those two cases rest on their decisions (rounding cannot be compared more
   tightly there: another CPU moves single pixels of them by 1e-2).

Measured (``python tests/golden_matrix.py``: the test under ATEN_CPU_CAPABILITY default,
avx2 and avx512 x 1 and 2 torch threads, and MKL_ENABLE_INSTRUCTIONS=AVX2 and SSE4_2 for
MKL's narrower code paths, as a non-Intel CPU gets, against the file recorded with avx512
and 2 threads on an Intel Xeon): decisions equal everywhere; the largest deviation is 5.2%
of its tolerance (the TSI of tiny-flux-cfg/adaptive on MKL's AVX2 path; at most 1.3% across
the torch capabilities and thread counts: the block means of wan-digits/rule-fast), a margin
of 19x, of which sqrt(K) ~ 20 (typical versus worst-case rounding) is the expected part.
Sensitive all the same: ``test_check_catches_changed_math`` reruns flux-digits/rule-slow with
the linear predictor instead of the rational one (fails by 199x its tolerance) and with the
extrapolation's weight on R1 made 1% larger (33x), and moves 16 of its 512 output values by
2e-3 (8.7x).

The thread count is TCPADE_GOLDEN_THREADS (default 2, the development machine's); the
decisions and tolerances hold for any. Regenerate with ``python tests/test_golden.py
--write`` (reruns the probes: a few minutes on two cores) only for a deliberate change of
the math (the decisions change, or floats move beyond the tolerance), and say which in the
commit; ``--add`` computes only the cases the file does not have yet. Never regenerate to
make another CPU pass: a failure there with equal decisions means the tolerance model is
wrong, and ``tests/golden_matrix.py`` shows by how much.
"""

import contextlib
import json
import math
import os
import platform
import random
import re
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from helpers import rule_fast, rule_slow  # noqa: E402

import tcpade  # noqa: E402
from tcpade import TCPadeConfig, coef, ops, zoo  # noqa: E402
from tcpade.tools import tiny  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "golden" / "presets.json"
CONFIGS = {"rule-slow": rule_slow, "rule-fast": rule_fast, "paper": TCPadeConfig.paper,
           "adaptive": TCPadeConfig.adaptive, "slow": TCPadeConfig.slow, "fast": TCPadeConfig.fast}  # fmt: skip
PRESETS = tuple(CONFIGS)
STEPS = 20
# The zoo models the golden file was recorded on (later zoo models are not in it).
GOLDEN_MODELS = ("flux-digits", "dit-faces", "wan-digits")
CASES = [(f"{m}/{p}", m, p) for m in GOLDEN_MODELS for p in PRESETS]
CASES += [(f"tiny-flux-cfg/{p}", None, p) for p in PRESETS]
# Another thread count sums the matmuls in another order: the tolerances cover it.
THREADS = int(os.environ.get("TCPADE_GOLDEN_THREADS", "2"))

U = 2.0**-24  # float32 unit roundoff
PROBE = 2.0**-20  # relative size of the probe perturbation of each nn.Linear output
PROBE_SEEDS = (1, 2)
BLOCKS = 16  # block means per sample
NPROJ = 8  # random +-1 projections
PROJ_SEED = 20240601


# --------------------------------------------------------------------------- running a case


@contextlib.contextmanager
def _perturbed(module: torch.nn.Module, delta: float, seed: int):
    """Every nn.Linear output y of ``module`` gets delta * rms(y) * N(0, 1) added."""
    if not delta:
        yield
        return
    gen = torch.Generator().manual_seed(seed)

    def hook(mod, inp, out):
        rms = out.detach().double().pow(2).mean().sqrt().item()
        return out + (delta * rms) * torch.randn(out.shape, generator=gen, dtype=out.dtype)

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, torch.nn.Linear)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _widest_linear(module: torch.nn.Module) -> int:
    return max(m.in_features for m in module.modules() if isinstance(m, torch.nn.Linear))


def run_case(model, preset, config=None, delta: float = 0.0, seed: int = 0):
    """(output tensor, tcpade summary, K) of one case; ``config`` replaces the preset's,
    ``delta`` > 0 perturbs every matmul output (the probe of the module docstring)."""
    config = CONFIGS[preset]() if config is None else config
    with torch.no_grad():
        if model is not None:
            m = zoo.load(model)
            labels = [i % m.spec.num_classes for i in (3, 7)]
            with _perturbed(m.transformer, delta, seed):
                out, summary = m.sample(seeds=[0, 1], labels=labels, steps=STEPS, config=config,
                                        return_summary=True)  # fmt: skip
            return out, summary, _widest_linear(m.transformer)
        pipe, generate = tiny.flux_pipeline()
        pipe.set_progress_bar_config(disable=True)
        tcpade.apply(pipe, config)
        try:
            with _perturbed(pipe.transformer, delta, seed):
                out = generate(STEPS)
            return out, tcpade.summary(pipe), _widest_linear(pipe.transformer)
        finally:
            tcpade.remove(pipe)


# --------------------------------------------------------------------------- recording


def _float(x, digits=12):
    return None if math.isnan(x) else float(f"{x:.{digits}g}")


def _signs(n: int) -> torch.Tensor:
    """(NPROJ, n) float64 +-1, the same on every machine and Python version."""
    rng = random.Random(PROJ_SEED + n)
    rows = []
    for _ in range(NPROJ):
        bits = rng.getrandbits(n)
        rows.append([1.0 if (bits >> i) & 1 else -1.0 for i in range(n)])
    return torch.tensor(rows, dtype=torch.float64)


def fingerprint(out: torch.Tensor) -> dict:
    """The compared summary of an output (module docstring): float64 statistics of its float32 values."""
    x = out.detach().to(torch.float32).cpu().reshape(out.shape[0], -1).double()
    flat = x.reshape(-1)
    n = flat.numel()
    blocks = [float(c.mean()) for row in x for c in row.tensor_split(BLOCKS)]
    proj = (_signs(n) @ flat / n).tolist()
    stats = dict(sum=flat.sum(), l2=flat.norm(), min=flat.min(), max=flat.max())
    return dict(n=n, **{k: _float(float(v)) for k, v in stats.items()}, blocks=[_float(v) for v in blocks],
                proj=[_float(v) for v in proj])  # fmt: skip


def record(out: torch.Tensor, summary) -> dict:
    """Decisions, floats and the output fingerprint of one run."""
    branches = {}
    for name, recs in summary.branches.items():
        branches[name] = dict(
            computed=[r.k for r in recs if r.computed],
            reasons=[r.reason for r in recs],
            nonfinite=[r.k for r in recs if r.nonfinite],
            tsi=[_float(r.tsi, 10) for r in recs],
            error=[_float(r.error, 10) for r in recs],
        )
    return dict(branches=branches, out=fingerprint(out))


def _decisions(rec: dict) -> dict:
    return {name: dict(computed=b["computed"], reasons=b["reasons"], nonfinite=b["nonfinite"],
                       tsi=[v is None for v in b["tsi"]], error=[v is None for v in b["error"]])
            for name, b in rec["branches"].items()}  # fmt: skip


def _scaled(v, f):
    return None if v is None else v * f


def _mean_entries(fp: dict) -> list:
    return fp["blocks"] + fp["proj"] + [_scaled(fp["sum"], 1.0 / fp["n"])]


def _point_entries(fp: dict) -> list:
    return [fp["min"], fp["max"], _scaled(fp["l2"], 1.0 / math.sqrt(fp["n"]))]


def deviations(want: dict, got: dict) -> dict:
    """Largest absolute deviation of got from want per float quantity (equal decisions assumed)."""
    dev = dict(tsi=0.0, error=0.0, mean=0.0, point=0.0)
    for name, b in want["branches"].items():
        for q in ("tsi", "error"):
            for a, g in zip(b[q], got["branches"][name][q]):
                if a is not None and g is not None:
                    dev[q] = max(dev[q], abs(a - g))
    for q, entries in (("mean", _mean_entries), ("point", _point_entries)):
        # None: a NaN output (an infinite deviation unless both are NaN)
        diffs = [abs(a - g) if None not in (a, g) else 0.0 if a is g else math.inf
                 for a, g in zip(entries(want["out"]), entries(got["out"]))]  # fmt: skip
        dev[q] = max(diffs)
    return dev


def _scales(rec: dict) -> dict:
    """The floor of each amplification: the quantity's own scale."""
    vals = [v for b in rec["branches"].values() for v in b["error"] if v is not None]
    big = max(abs(rec["out"]["min"]), abs(rec["out"]["max"]))
    return dict(tsi=1.0, error=max(vals, default=0.0), mean=big, point=big)


def tolerances(want: dict) -> dict:
    """tol_q = 2 K u A_q (module docstring)."""
    return {q: 2.0 * want["k"] * U * a for q, a in want["amp"].items()}


def check(want: dict, got: dict):
    """(mismatches, report): the decisions compared exactly, the floats within the tolerances;
    ``report[q]`` = (largest deviation, tolerance) per quantity, decisions as (0 or 1, 0)."""
    bad = []
    same = _decisions(want) == _decisions(got)
    report = dict(decisions=(0.0 if same else 1.0, 0.0))
    if not same:
        bad.append(f"decisions differ: want {_decisions(want)}, got {_decisions(got)}")
        return bad, report
    tol = tolerances(want)
    for q, d in deviations(want, got).items():
        report[q] = (d, tol[q])
        if not d <= tol[q]:
            bad.append(f"{q}: deviation {d:.3g} > tolerance {tol[q]:.3g} ({d / tol[q]:.3g}x)")
    return bad, report


def compute(model, preset) -> dict:
    """The golden record of a case: its run, K, and the amplifications measured by the probes."""
    out, summary, k = run_case(model, preset)
    rec = record(out, summary)
    amp = _scales(rec)
    for seed in PROBE_SEEDS:
        p_out, p_summary, _ = run_case(model, preset, delta=PROBE, seed=seed)
        p = record(p_out, p_summary)
        if _decisions(p) != _decisions(rec):
            raise RuntimeError(f"{model}/{preset}: a rounding-size perturbation (seed {seed}) changes the decisions")
        dev = deviations(rec, p)
        dev["point"] = float((p_out.double() - out.double()).abs().max())  # the max norm bounds min, max, rms
        for q, d in dev.items():
            amp[q] = max(amp[q], d / PROBE)
    rec.update(k=k, amp={q: float(f"{a:.3g}") for q, a in amp.items()})
    return rec


# --------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def golden():
    return json.loads(GOLDEN.read_text())


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(old)


def _report(case: str, report: dict) -> None:
    """Append the case's deviations to $TCPADE_GOLDEN_REPORT (tests/golden_matrix.py reads it)."""
    path = os.environ.get("TCPADE_GOLDEN_REPORT")
    if path:
        line = dict(case=case, capability=torch.backends.cpu.get_cpu_capability(), threads=torch.get_num_threads(),
                    report=report)  # fmt: skip
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")


@pytest.mark.parametrize("case, model, preset", CASES, ids=[c[0] for c in CASES])
def test_presets_match_golden(golden, case, model, preset):
    want = golden["cases"][case]
    out, summary, k = run_case(model, preset)
    assert k == want["k"], case
    bad, report = check(want, record(out, summary))
    _report(case, report)
    assert not bad, (case, bad)


def _thresholds(config) -> tuple:
    """(quantity, thresholds) a decision of this config compares a recorded float with."""
    if config.plan(STEPS) is not None:
        return None, ()
    if config.policy == "error":
        return "error", tuple(f * config.tolerance for f in (0.5, 1.0, 2.0))
    return "tsi", (config.tsi_threshold,)


@pytest.mark.parametrize("case, model, preset", CASES, ids=[c[0] for c in CASES])
def test_decisions_have_margin(golden, case, model, preset):
    """Every float a decision of the case reads is farther from its thresholds than the
    tolerance of that float: rounding on another CPU cannot flip the exact decisions."""
    want = golden["cases"][case]
    q, thresholds = _thresholds(CONFIGS[preset]())
    if q is None:
        return
    tol = tolerances(want)[q]
    values = [v for b in want["branches"].values() for v in b[q] if v is not None]
    assert values, case
    margin = min(abs(v - t) for v in values for t in thresholds)
    assert margin > tol, (case, q, margin, tol)


def test_check_catches_changed_math(golden, monkeypatch):
    """The float comparison is sensitive: another predictor, a coefficient changed by 1% and
    a change of one output block fail it, each several times beyond the tolerance, while the
    same math passes (the case has a fixed plan: the decisions cannot tell these apart)."""
    case, model, preset = "flux-digits/rule-slow", "flux-digits", "rule-slow"
    want = golden["cases"][case]
    out, summary, _ = run_case(model, preset)
    assert check(want, record(out, summary))[0] == []

    def excess(rec):
        bad, report = check(want, rec)
        assert bad, report
        return max(d / t for d, t in report.values() if t > 0)

    ratios = dict(predictor=excess(record(*run_case(model, preset, config=rule_slow(predictor="linear"))[:2])))
    build = coef.build_coef

    def lam1_up(*args, **kwargs):  # the weight of R1 in the extrapolation, 1% larger
        c = build(*args, **kwargs)
        c[coef.LAM1] *= 1.01
        return c

    with monkeypatch.context() as m:
        m.setattr(coef, "build_coef", lam1_up)
        ratios["coefficient"] = excess(record(*run_case(model, preset)[:2]))
    bumped = out.clone()
    bumped[0, 0, :4, :4] += 2e-3  # 16 of 512 values move by 2e-3 (0.1% of the range)
    ratios["one block"] = excess(record(bumped, summary))
    print("changed math fails the check by (x tolerance):", {k: round(v, 1) for k, v in ratios.items()})
    assert all(r > 5 for r in ratios.values()), ratios


# --------------------------------------------------------------------------- writing


def _dump(data: dict) -> str:
    """Indented JSON with every list of numbers or strings on one line."""
    text = json.dumps(data, indent=1, sort_keys=True)

    def one_line(m):
        return "[" + ", ".join(s.strip() for s in m.group(1).split(",") if s.strip()) + "]"

    return re.sub(r"\[([^\[\]{}]*)\]", one_line, text) + "\n"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__" and ("--write" in sys.argv or "--add" in sys.argv):
    torch.set_num_threads(THREADS)
    have = json.loads(GOLDEN.read_text())["cases"] if "--add" in sys.argv else {}
    cases = {}
    for case, model, preset in CASES:
        cases[case] = have[case] if case in have else compute(model, preset)
        print(case, cases[case]["amp"], flush=True)
    meta = dict(torch=torch.__version__, backends=ops.available_backends("cpu"), steps=STEPS, threads=THREADS,
                capability=torch.backends.cpu.get_cpu_capability(), cpu=_cpu(), probe=PROBE,
                probe_seeds=PROBE_SEEDS)  # fmt: skip
    GOLDEN.write_text(_dump(dict(meta=meta, cases=cases)))
    print(f"wrote {GOLDEN} ({len(cases)} cases, {GOLDEN.stat().st_size} bytes)")
