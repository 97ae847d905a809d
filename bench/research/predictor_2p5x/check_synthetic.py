"""Each candidate on synthetic histories: exact where it should be (linear-in-k residuals and inputs,
same-direction residuals for the norm rules; quadratic for the Newton rule). Prints max errors."""
import torch
import preds as P

torch.manual_seed(0)
B, N, C = 2, 5, 4
A, Bv, Cq, X0, X1 = (torch.randn(B, N, C) for _ in range(5))
ks = [8, 5, 3, 0]  # newest first, gaps 3, 2, 3
k = 10


def hist_of(Rf, Xf):
    return [(kk, float(kk), [Rf(kk)], [Xf(kk)]) for kk in ks]


lin = lambda kk: A + Bv * kk  # noqa: E731
xl = lambda kk: X0 + X1 * kk  # noqa: E731
for name in ["mix:0.3", "mix:-0.5", "choose:linear/lin13/reuse", "linear", "sign", "cherr", "ells", "s13err", "elerr+ch:1", "sign+ch:1", "lin13+ch:1", "tokcos", "tokls:1", "tokls:1.5", "tokerr", "elerr", "blend:0.25", "blend:0.5",
             "blend:0.75", "chanerr:1", "scalerr:1", "chanls:1:3", "ef:0.5:s", "ef:1:q", "lin13", "quadreg"]:
    p = P.make(name, 20)
    h = hist_of(lin, xl)
    st = {}
    # observe at k1 = 8 with the older entries (error 0 for a linear sequence)
    p.observe(h[1:], 8, 8.0, [xl(8)], [lin(8)], st)
    out = p.predict(h, k, float(k), [xl(k)], st)[0]
    err = float((out - (xl(k) + lin(k))).abs().max())
    print(f"{name:12s} linear-in-k: max err {err:.2e}", "OK" if err < 1e-4 else "FAIL")
# same-direction residuals (norm linear in k) for the norm rules
sd = lambda kk: A * (1 + 0.1 * kk)  # noqa: E731
for name in ["toknorm", "toknorm1"]:
    p = P.make(name, 20)
    out = p.predict(hist_of(sd, xl), k, float(k), [xl(k)], {})[0]
    err = float((out - (xl(k) + sd(k))).abs().max())
    print(f"{name:12s} same-direction linear norm: max err {err:.2e}", "OK" if err < 1e-4 else "FAIL")
# quadratic: the Newton rule on equal gaps
ks = [9, 6, 3, 0]
qd = lambda kk: A + Bv * kk + Cq * kk * kk  # noqa: E731
for name in ["quadreg", "ef:1:q"]:
    p = P.make(name, 20)
    h = hist_of(qd, xl)
    st = {}
    p.observe(h[1:], 9, 9.0, [xl(9)], [qd(9)], st)
    out = p.predict(h, 11, 11.0, [xl(11)], st)[0]
    err = float((out - (xl(11) + qd(11))).abs().max())
    print(f"{name:12s} quadratic, equal gaps: max err {err:.2e}", "OK" if err < 1e-3 else "FAIL")
# the library's linear coefficients equal ours on an arbitrary history
h = [(kk, float(kk), [torch.randn(B, N, C)], [torch.randn(B, N, C)]) for kk in [8, 5, 3]]
x = [torch.randn(B, N, C)]
for kk in (9, 10):
    a = P.make("linear", 20).predict(h, kk, float(kk), x, {})[0]
    b = P.make("linear_lib", 20).predict(h, kk, float(kk), x, {})[0]
    print(f"linear vs library linear coefficients at k={kk}: max diff {float((a - b).abs().max()):.2e}")
# input-aware: R = linear + b_c X with X quadratic in k (per-sample, per-channel gain b): chanerr exact
bc = torch.randn(B, 1, C)
ks = [8, 5, 3, 0]
xq = lambda kk: X0 + X1 * kk + Cq * kk * kk  # noqa: E731
rq = lambda kk: A + Bv * kk + bc * xq(kk)  # noqa: E731
for name in ["chanerr:1", "linear"]:
    p = P.make(name, 20)
    out = p.predict(hist_of(rq, xq), k, float(k), [xq(k)], {})[0]
    err = float((out - (xq(k) + rq(k))).abs().max())
    print(f"{name:12s} R = linear + b_c X, X quadratic: max err {err:.2e}", "(chanerr should be ~0)")
