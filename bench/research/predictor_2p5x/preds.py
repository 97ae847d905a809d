"""Candidate predictors for skipped steps (step-index axis). Each is an object with
predict(hist, k, t, x, st) -> [h_out per stream] and observe(hist, k, t, x, R, st) (called on a
computed step k before its entry is stored; hist = the entries before it, newest first).
hist entries: (k_i, t_i, [R_i per stream], [X_i per stream]); x: the current inputs per stream.
Tensors are [B, N, C] (batch, tokens, channels); "per token" reduces over C, "per channel" over N.
"""
from __future__ import annotations

import torch

# (PYTHONPATH=bench:bench/research/partial_stack:bench/research/predictor_2p5x: see README.md)
from emulate import parse_predictor  # the library's coefficients: ours:<variant>

EPS = 1e-12


def tdot(a, b):
    return (a * b).sum(-1, keepdim=True)


class Base:
    need = 2  # residuals needed by the main rule; fewer -> fallback (linear, then reuse)

    def observe(self, hist, k, t, x, R, st):
        pass

    def predict(self, hist, k, t, x, st):
        out = []
        for j, xj in enumerate(x):
            out.append(self.one(hist, j, k, xj, st))
        return out

    def one(self, hist, j, k, x, st):
        if len(hist) < self.need:
            return x + lin_r(hist, j, k)
        return x + self.rhat(hist, j, k, x, st)


def lin_r(hist, j, k):
    """The shipped linear: R1 + (R1 - R2) (k - k1) / (k1 - k2); one residual -> R1."""
    R1 = hist[0][2][j]
    if len(hist) < 2:
        return R1
    s = (k - hist[0][0]) / (hist[0][0] - hist[1][0])
    return R1 + (R1 - hist[1][2][j]) * s


def lin_of(vals, ks, k):
    if len(vals) < 2:
        return vals[0]
    return vals[0] + (vals[0] - vals[1]) * ((k - ks[0]) / (ks[0] - ks[1]))


class Lin(Base):
    def rhat(self, hist, j, k, x, st):
        return lin_r(hist, j, k)


class Reuse(Base):
    def one(self, hist, j, k, x, st):
        return x + hist[0][2][j]


class Ours(Base):
    """The library's coefficients and torch reference (partial_stack's ``ours:<variant>``)."""

    def __init__(self, variant, total):
        self.f = parse_predictor(f"ours:{variant}", total)

    def predict(self, hist, k, t, x, st):
        return self.f(hist, k, t, x)

    def one(self, hist, j, k, x, st):
        return self.f([(e[0], e[1], [e[2][j]]) for e in hist], k, float("nan"), [x])[0]


def _d12(hist, j):
    (k1, _, r1, _), (k2, _, r2, _), (k3, _, r3, _) = hist[:3]
    R1, R2, R3 = r1[j], r2[j], r3[j]
    D1 = (R1 - R2) / (k1 - k2)  # per step
    D2 = (R2 - R3) / (k2 - k3)
    return R1, R2, R3, D1, D2


class SignAgree(Base):
    """C1a: per element, linear where the last two per-step differences agree in sign, else reuse."""
    need = 3

    def rhat(self, hist, j, k, x, st):
        R1, R2, R3, D1, D2 = _d12(hist, j)
        return R1 + D1 * (k - hist[0][0]) * (D1 * D2 > 0)


class TokCos(Base):
    """C1b: per token, slope weight clamp(cos(D1, D2), 0, 1)."""
    need = 3

    def rhat(self, hist, j, k, x, st):
        R1, R2, R3, D1, D2 = _d12(hist, j)
        c = tdot(D1, D2) / (tdot(D1, D1).sqrt() * tdot(D2, D2).sqrt() + EPS)
        return R1 + D1 * (k - hist[0][0]) * c.clamp(0, 1)


class TokLS(Base):
    """C1c: per token, the ratio d of the last increment R1 - R2 to the increment the older slope
    predicted for it ((R2 - R3)/(k2 - k3) (k1 - k2)), least squares over channels, clamped to
    [0, hi]; R_hat = R1 + d (R1 - R2) s."""
    need = 3

    def __init__(self, hi=1.0):
        self.hi = hi

    def rhat(self, hist, j, k, x, st):
        R1, R2, R3, D1, D2 = _d12(hist, j)
        P = D2 * (hist[0][0] - hist[1][0])
        d = tdot(R1 - R2, P) / (tdot(P, P) + EPS)
        return R1 + D1 * (k - hist[0][0]) * d.clamp(0, self.hi)


class TokErr(Base):
    """C1d: per token (or element), soft choice from the errors linear and reuse would have made at
    the newest computed step k1 (predicting R1 from R2, R3): w = er^2 / (el^2 + er^2), the weight of
    the slope; R_hat = R1 + w (R1 - R2) s."""
    need = 3

    def __init__(self, per="token"):
        self.per = per

    def rhat(self, hist, j, k, x, st):
        R1, R2, R3, D1, D2 = _d12(hist, j)
        el = R1 - (R2 + D2 * (hist[0][0] - hist[1][0]))
        er = R1 - R2
        if self.per == "token":
            el2, er2 = tdot(el, el), tdot(er, er)
        elif self.per == "channel":
            el2, er2 = (el * el).sum(1, keepdim=True), (er * er).sum(1, keepdim=True)
        else:
            el2, er2 = el * el, er * er
        w = er2 / (el2 + er2 + EPS)
        return R1 + D1 * (k - hist[0][0]) * w


class BlendOut(Base):
    """C2: a (x + R_lin) + (1 - a) H_lin, H = X + R the stored stack outputs, extrapolated linearly
    (a = 1: the shipped linear; a = 0: TCPadeConfig(extrapolate="h_out"))."""

    def __init__(self, a):
        self.a = a

    def one(self, hist, j, k, x, st):
        ks = [e[0] for e in hist]
        H = [e[2][j] + e[3][j] for e in hist[:2]]
        res = x + lin_r(hist, j, k)
        out = lin_of(H, ks, k)
        return self.a * res + (1 - self.a) * out


class ChanErr(Base):
    """C3: input-aware correction. At k1 the deviations of X1 and R1 from their linear extrapolations
    from (k3, k2) give a per-sample per-channel gain b = <eX, eR>_tokens / <eX, eX>_tokens (clamped
    to [-bmax, bmax]; ``per="scalar"``: one gain per sample); R_hat = R_lin + c b (x - X_lin)."""
    need = 3

    def __init__(self, c=1.0, per="channel", bmax=2.0):
        self.c, self.per, self.bmax = c, per, bmax

    def rhat(self, hist, j, k, x, st):
        ks = [e[0] for e in hist]
        Rs = [e[2][j] for e in hist[:3]]
        Xs = [e[3][j] for e in hist[:3]]
        eR = Rs[0] - lin_of(Rs[1:], ks[1:], ks[0])
        eX = Xs[0] - lin_of(Xs[1:], ks[1:], ks[0])
        dims = (1,) if self.per == "channel" else (1, 2)
        b = (eX * eR).sum(dims, keepdim=True) / ((eX * eX).sum(dims, keepdim=True) + EPS)
        b = b.clamp(-self.bmax, self.bmax)
        return lin_of(Rs, ks, k) + self.c * b * (x - lin_of(Xs, ks, k))


class ChanLS(Base):
    """C3b: per-channel least-squares map from input differences to residual differences over the
    stored pairs (X_i - X_1, R_i - R_1), i = 2..m; R_hat = R_lin + c b (x - X_lin)."""
    need = 2

    def __init__(self, c=1.0, m=3, bmax=2.0):
        self.c, self.m, self.bmax = c, m, bmax

    def rhat(self, hist, j, k, x, st):
        ks = [e[0] for e in hist]
        Rs = [e[2][j] for e in hist[: self.m]]
        Xs = [e[3][j] for e in hist[: self.m]]
        num = sum(((Xs[i] - Xs[0]) * (Rs[i] - Rs[0])).sum(1, keepdim=True) for i in range(1, len(Rs)))
        den = sum(((Xs[i] - Xs[0]) ** 2).sum(1, keepdim=True) for i in range(1, len(Rs)))
        b = (num / (den + EPS)).clamp(-self.bmax, self.bmax)
        return lin_of(Rs, ks, k) + self.c * b * (x - lin_of(Xs, ks, k))


class ErrFeedback(Base):
    """C4: on a computed step k the error e of the linear prediction for k (from the entries before
    it) is kept; a skip adds beta e scaled by ``scale``: "s" (k - k1)/(k1 - k2) (a slope
    correction), "q" (k - k1)(k - k2)/((k1 - k2)(k1 - k3)) (the quadratic's growth), "c" 1."""

    def __init__(self, beta, scale):
        self.beta, self.scale = beta, scale

    def observe(self, hist, k, t, x, R, st):
        st["e"] = [R[j] - lin_r(hist, j, k) for j in range(len(R))]
        st["ke"] = k

    def one(self, hist, j, k, x, st):
        r = lin_r(hist, j, k)
        if "e" in st and len(hist) >= 3 and st["ke"] == hist[0][0]:
            k1, k2, k3 = hist[0][0], hist[1][0], hist[2][0]
            f = {"s": (k - k1) / (k1 - k2), "q": (k - k1) * (k - k2) / ((k1 - k2) * (k1 - k3)), "c": 1.0}[self.scale]
            r = r + self.beta * f * st["e"][j]
        return x + r


class Lin13(Base):
    """C5a: slope = mean of the slopes of (R1, R2) and (R1, R3)."""
    need = 3

    def rhat(self, hist, j, k, x, st):
        (k1, _, r1, _), (k2, _, r2, _), (k3, _, r3, _) = hist[:3]
        sl = 0.5 * ((r1[j] - r2[j]) / (k1 - k2) + (r1[j] - r3[j]) / (k1 - k3))
        return r1[j] + sl * (k - k1)


class QuadReg(Base):
    """C5b: Newton quadratic through R1..R3 where the two gaps are equal (else linear), times beta."""
    need = 3

    def __init__(self, beta=1.0, regular_only=True):
        self.beta, self.reg = beta, regular_only

    def rhat(self, hist, j, k, x, st):
        (k1, _, r1, _), (k2, _, r2, _), (k3, _, r3, _) = hist[:3]
        R = lin_r(hist, j, k)
        if self.reg and (k1 - k2) != (k2 - k3):
            return R
        D1 = (r1[j] - r2[j]) / (k1 - k2)
        D2 = (r2[j] - r3[j]) / (k2 - k3)
        c = (D1 - D2) / (k1 - k3)
        return R + self.beta * c * (k - k1) * (k - k2)


class TokNorm(Base):
    """C6: per token, the norm extrapolated linearly (clamped >= 0) and the direction of the linear
    prediction ("lin") or of R1 ("r1")."""

    def __init__(self, direction="lin"):
        self.dir = direction

    def rhat(self, hist, j, k, x, st):
        R1, R2 = hist[0][2][j], hist[1][2][j]
        s = (k - hist[0][0]) / (hist[0][0] - hist[1][0])
        n1, n2 = tdot(R1, R1).sqrt(), tdot(R2, R2).sqrt()
        nh = (n1 + (n1 - n2) * s).clamp_min(0)
        D = lin_r(hist, j, k) if self.dir == "lin" else R1
        return D * (nh / (tdot(D, D).sqrt() + EPS))


class ElLS(Base):
    """C1e: per element, the ratio of the newest per-step difference to the previous one,
    d = clamp(D2 / D1, 0, 1) written as clamp(D1 D2 / D1^2, 0, 1) (the soft version of ``sign``: 1
    where the trend held, less where it slowed, 0 where it turned)."""
    need = 3

    def rhat(self, hist, j, k, x, st):
        R1, R2, R3, D1, D2 = _d12(hist, j)
        d = (D1 * D2 / (D1 * D1 + EPS)).clamp(0, 1)
        return R1 + D1 * (k - hist[0][0]) * d


class Slope13Err(Base):
    """elerr with lin13's slope: w per element from the errors at k1, slope the mean of (R1, R2)'s
    and (R1, R3)'s."""
    need = 3

    def rhat(self, hist, j, k, x, st):
        R1, R2, R3, D1, D2 = _d12(hist, j)
        el = R1 - (R2 + D2 * (hist[0][0] - hist[1][0]))
        er = R1 - R2
        w = er * er / (el * el + er * er + EPS)
        sl = 0.5 * (D1 + (R1 - R3) / (hist[0][0] - hist[2][0]))
        return R1 + sl * (k - hist[0][0]) * w


class WithChan(Base):
    """A base rule plus chanerr's input-aware term c b (x - X_lin)."""
    need = 3

    def __init__(self, base, c):
        self.base, self.corr = base, ChanErr(c, "channel")

    def rhat(self, hist, j, k, x, st):
        return self.base.rhat(hist, j, k, x, st) + self.corr.rhat(hist, j, k, x, st) - lin_r(hist, j, k)


class SlopeMix(Base):
    """C5c: slope = D1 + a (D2 - D1) (D1, D2 the per-step differences of (R1, R2) and (R2, R3)):
    a = 0 the shipped linear, a = 1 the older slope; lin13 is a = g2 / (2 (g1 + g2)), about 0.2-0.3.
    Negative a adds curvature (toward the quadratic)."""
    need = 3

    def __init__(self, a):
        self.a = a

    def rhat(self, hist, j, k, x, st):
        R1, R2, R3, D1, D2 = _d12(hist, j)
        return R1 + (D1 + self.a * (D2 - D1)) * (k - hist[0][0])


class Chooser(Base):
    """C7: online choice among candidate rules, per sample, pooled over CFG branches: on a computed
    step k each candidate predicts k's residual (image stream) from the entries before it; a skip
    uses the candidate with the smallest squared error at the newest computed step (linear before
    any error is known)."""

    def __init__(self, names, total):
        self.names = names
        self.cands = [make(n, total) for n in names]
        self.err = {}  # k -> [B] tensor per candidate (summed over branches)

    def observe(self, hist, k, t, x, R, st):
        errs = []
        for c in self.cands:
            r = c.one(hist, 0, k, x[0], st) - x[0]
            errs.append(((r - R[0]) ** 2).flatten(1).sum(1))
        e = torch.stack(errs)  # [ncand, B]
        self.err[k] = self.err[k] + e if k in self.err else e

    def one(self, hist, j, k, x, st):
        k1 = hist[0][0]
        if k1 not in self.err:
            return x + lin_r(hist, j, k)
        pick = self.err[k1].argmin(0)  # [B]
        outs = torch.stack([c.one(hist, j, k, x, st) for c in self.cands])  # [ncand, B, ...]
        return outs.gather(0, pick.view(1, -1, *([1] * (outs.dim() - 2))).expand(1, *outs.shape[1:]))[0]


class FirstScale(Base):
    """Diagnostic of the first skips: with one residual stored the prediction is c R0 (the shipped
    rule: c = 1, reuse); with two or more, the shipped linear."""

    def __init__(self, c):
        self.c = c

    def one(self, hist, j, k, x, st):
        if len(hist) < 2:
            return x + self.c * hist[0][2][j]
        return x + lin_r(hist, j, k)


def make(name, total):
    """Candidate by name."""
    p = name.split(":")
    f = lambda i, d: float(p[i]) if len(p) > i else d  # noqa: E731
    if p[0] in ("rational", "reuse_lib", "linear_lib"):
        return Ours({"reuse_lib": "reuse", "linear_lib": "linear"}.get(p[0], p[0]), total)
    table = {
        "linear": lambda: Lin(),
        "reuse": lambda: Reuse(),
        "sign": lambda: SignAgree(),
        "tokcos": lambda: TokCos(),
        "tokls": lambda: TokLS(f(1, 1.0)),
        "tokerr": lambda: TokErr("token"),
        "elerr": lambda: TokErr("element"),
        "blend": lambda: BlendOut(f(1, 0.5)),
        "cherr": lambda: TokErr("channel"),
        "mix": lambda: SlopeMix(f(1, 0.5)),
        "first": lambda: FirstScale(f(1, 1.0)),
        "choose": lambda: Chooser(name.split(":", 1)[1].split("/"), total),
        "ells": lambda: ElLS(),
        "s13err": lambda: Slope13Err(),
        "elerr+ch": lambda: WithChan(TokErr("element"), f(1, 1.0)),
        "sign+ch": lambda: WithChan(SignAgree(), f(1, 1.0)),
        "lin13+ch": lambda: WithChan(Lin13(), f(1, 1.0)),
        "chanerr": lambda: ChanErr(f(1, 1.0), "channel"),
        "scalerr": lambda: ChanErr(f(1, 1.0), "scalar"),
        "chanls": lambda: ChanLS(f(1, 1.0), int(f(2, 3))),
        "ef": lambda: ErrFeedback(f(1, 0.5), p[2] if len(p) > 2 else "s"),
        "lin13": lambda: Lin13(),
        "quadreg": lambda: QuadReg(f(1, 1.0), True),
        "toknorm": lambda: TokNorm("lin"),
        "toknorm1": lambda: TokNorm("r1"),
    }
    return table[p[0]]()
