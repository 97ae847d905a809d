// tcpade._C: the CPU backend of tcpade's two fused ops (update, predict).
//
// The math is specified exactly by tcpade/core/reference.py (functions update and predict,
// compute_dtype=float32). The shared tables (the sums' and coefficients' positions, the
// variant codes, the paper's constants) come from tcpade/core/layout.py through the header
// tcpade_layout.h, which setup.py generates from it at build time. Every value is
// loaded from its storage dtype, all arithmetic is float32, and the result is rounded
// to the storage dtype only at the store. Sums are accumulated in double per thread and
// reduced in thread order (deterministic for a fixed thread count).
//
// Parallelisation: OpenMP over token rows (schedule static); a thread always owns whole
// rows, which the rational variant needs (one denominator per row). Inside a row, one
// fused pass over the C elements does loads, math, sums, rounding and stores (plus a
// reduction pass for rational and a main-prediction pass for 16-bit paper), each loop
// written so that gcc -O3 auto-vectorises it (branch-free selects, `omp simd`
// reductions for the double accumulators). No -ffast-math: NaN/Inf semantics matter.
//
// Instruction sets: the kernel half of this file is compiled several times (it includes
// itself), once per x86 ISA level (baseline SSE2, AVX2, AVX-512), and the widest one the
// CPU supports is picked at import (TCPADE_CPU_ISA=sse2 or avx2 forces a lower one).
// FMA contraction is off, so every level rounds exactly the same way (bitwise identical
// outputs).
//
// Interface: pointers are passed as Python ints (tensor.data_ptr()), 0 = absent; all
// tensors contiguous and of one dtype (0 float32, 1 bfloat16, 2 float16).

#ifndef TC_KERNEL_NS
// =================================================================== common part

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#ifdef _OPENMP
#include <omp.h>
#else  // built without OpenMP (e.g. Apple clang): one thread, same results
static inline int omp_get_max_threads() { return 1; }
static inline int omp_get_thread_num() { return 0; }
#endif

#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "tcpade_layout.h"  // generated from tcpade/core/layout.py (setup.py)

namespace py = pybind11;

namespace {

using namespace tcl;
constexpr int W_MAIN = CF_W_MAIN, C1 = CF_C1, C2 = CF_C2, GAMMA = CF_GAMMA;
constexpr int LAM1 = CF_LAM1, LAM2 = CF_LAM2;
constexpr int ALP0 = CF_ALP0, ALP1 = CF_ALP1, ALP2 = CF_ALP2;
constexpr int TAU0 = CF_TAU0, TAU1 = CF_TAU1, TAU2 = CF_TAU2;
constexpr int BMAX = CF_BMAX, KAPPA = CF_KAPPA, WAVG = CF_WAVG0;
static_assert(CF_WAVG3 == CF_WAVG0 + 3, "the four wavg weights are consecutive");

enum Variant { PAPER = VARIANT_PAPER, RATIONAL = VARIANT_RATIONAL, REUSE = VARIANT_REUSE, LINEAR = VARIANT_LINEAR };

using Sums = std::array<double, NSUMS>;

struct PredictArgs {
    int64_t rows, C, nslot;
    int variant;
    bool store, write_out;
    std::vector<int64_t> slots;
    std::array<float, NCOEF> cf;
};

}  // namespace

#define TC_INLINE inline __attribute__((always_inline))

// gcc (without -fno-trapping-math) refuses to if-convert the paper's loops: jump threading
// turns the selects of exp_paper into branches whose arithmetic "could trap", and the
// loop stays scalar (several times slower than vectorised). Assuming no FP traps (true
// under Python/torch: exceptions are masked) changes no result, only allows the
// speculation; NaN/Inf semantics are kept.
// clang does not trap-track by default and ignores this attribute.
#if defined(__GNUC__) && !defined(__clang__)
#define TC_NO_TRAPS __attribute__((noinline, optimize("no-trapping-math")))
#else
#define TC_NO_TRAPS __attribute__((noinline))
#endif

// ------------------------------------------------- the kernels, once per instruction set
// No contraction of a*b+c into one FMA (AVX-512F has FMA instructions): each float op
// rounds on its own, as in the eager reference, and every ISA level gives the same bits.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#elif defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif
#define TC_KERNEL_NS k_base  // baseline ISA of the target (SSE2 on x86-64)
#include "tcpade.cpp"  // this file (found next to itself), kernel part only
#undef TC_KERNEL_NS

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TC_MULTI_ISA 1
#pragma GCC push_options
#pragma GCC target("avx2")
#define TC_KERNEL_NS k_avx2
#include "tcpade.cpp"
#undef TC_KERNEL_NS
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,avx512f,avx512bw,avx512vl,avx512dq,prefer-vector-width=512")
#define TC_KERNEL_NS k_avx512
#include "tcpade.cpp"
#undef TC_KERNEL_NS
#pragma GCC pop_options
#endif
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options  // fp-contract
#endif


// ---------------------------------------------------------------- bindings
namespace {

void check_slots(const std::vector<int64_t>& slots, int64_t nslot) {
    if (nslot < 3) throw std::invalid_argument("tcpade._C: nslot must be >= 3, got " + std::to_string(nslot));
    if ((int64_t)slots.size() != nslot)
        throw std::invalid_argument("tcpade._C: len(slots) must equal nslot");
    for (int64_t s : slots)
        if (s < 0 || s >= nslot) throw std::invalid_argument("tcpade._C: slot index out of range");
}

void check_common(int64_t rows, int64_t C, int dtype, uintptr_t h_in, uintptr_t ring) {
    if (rows < 0 || C < 0) throw std::invalid_argument("tcpade._C: rows and C must be >= 0");
    if (C > INT32_MAX) throw std::invalid_argument("tcpade._C: the last dim C must be < 2^31");
    if (dtype < 0 || dtype > 2) throw std::invalid_argument("tcpade._C: dtype code must be 0, 1 or 2");
    (void)h_in;  // h_in == 0: a zero input (the output level), never read
    if (rows * C > 0 && ring == 0) throw std::invalid_argument("tcpade._C: ring must be given");
}

py::list to_list(const Sums& s) {
    py::list l;
    for (double v : s) l.append(v);
    return l;
}

// ---------------------------------------------------------------- ISA selection
using UpdateFn = Sums (*)(int, uintptr_t, uintptr_t, uintptr_t, const std::vector<int64_t>&, uintptr_t, int64_t,
                          int64_t, bool);
using PredictFn = Sums (*)(int, uintptr_t, uintptr_t, uintptr_t, uintptr_t, const PredictArgs&);

struct Isa {
    const char* name;
    UpdateFn update;
    PredictFn predict;
};

Isa pick_isa() {
    const char* env = std::getenv("TCPADE_CPU_ISA");
    const std::string want = env ? env : "";
#if defined(__x86_64__)
    const Isa base{"sse2", &k_base::run_update, &k_base::run_predict};
#else
    const Isa base{"baseline", &k_base::run_update, &k_base::run_predict};
#endif
#ifdef TC_MULTI_ISA
    __builtin_cpu_init();
    const bool has_avx2 = __builtin_cpu_supports("avx2");
    const bool has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    if (want == "sse2") return base;
    if (has_avx512 && want != "avx2") return {"avx512", &k_avx512::run_update, &k_avx512::run_predict};
    if (has_avx2) return {"avx2", &k_avx2::run_update, &k_avx2::run_predict};
#endif
    return base;
}

const Isa& isa() {
    static const Isa chosen = pick_isa();
    return chosen;
}

py::list py_update(uintptr_t h_in, uintptr_t h_out, uintptr_t ring, std::vector<int64_t> slots,
                   uintptr_t h_prev, int64_t rows, int64_t C, int64_t nslot, int dtype, bool probe) {
    check_common(rows, C, dtype, h_in, ring);
    check_slots(slots, nslot);
    if (rows * C > 0 && h_out == 0) throw std::invalid_argument("tcpade._C.update: h_out must be given");
    Sums s{};
    if (rows * C > 0) {
        const UpdateFn fn = isa().update;
        py::gil_scoped_release nogil;
        s = fn(dtype, h_in, h_out, ring, slots, h_prev, rows, C, probe);
    }
    return to_list(s);
}

py::list py_predict(uintptr_t h_in, uintptr_t ring, std::vector<int64_t> slots, std::vector<double> coef,
                    uintptr_t h_prev, uintptr_t out, int64_t rows, int64_t C, int64_t nslot, int dtype,
                    int variant, bool store) {
    check_common(rows, C, dtype, h_in, ring);
    check_slots(slots, nslot);
    if (variant < 0 || variant >= NVARIANTS)
        throw std::invalid_argument("tcpade._C.predict: variant code must be 0.." + std::to_string(NVARIANTS - 1));
    if ((int64_t)coef.size() < NCOEF)
        throw std::invalid_argument("tcpade._C.predict: coef needs " + std::to_string(NCOEF) + " values");
    PredictArgs A;
    A.rows = rows;
    A.C = C;
    A.nslot = nslot;
    A.variant = variant;
    A.store = store;
    A.write_out = out != 0;
    A.slots = slots;
    for (int k = 0; k < NCOEF; ++k) A.cf[(size_t)k] = (float)coef[(size_t)k];
    Sums s{};
    if (rows * C > 0) {
        const PredictFn fn = isa().predict;
        py::gil_scoped_release nogil;
        s = fn(dtype, h_in, ring, h_prev, out, A);
    }
    return to_list(s);
}

}  // namespace

PYBIND11_MODULE(_C, mod) {
    mod.doc() = "tcpade CPU kernels (C++/OpenMP): fused update and predict, see tcpade/core/reference.py";
    mod.def("update", &py_update, py::arg("h_in"), py::arg("h_out"), py::arg("ring"), py::arg("slots"),
            py::arg("h_prev"), py::arg("rows"), py::arg("C"), py::arg("nslot"), py::arg("dtype"),
            py::arg("probe"),
            "Write R = h_out - h_in into ring slot slots[nslot-1] (h_in = 0: a zero input, R = h_out, h_prev "
            "zeroed); return the sums (tcpade.core.layout.SUMS).");
    mod.def("predict", &py_predict, py::arg("h_in"), py::arg("ring"), py::arg("slots"), py::arg("coef"),
            py::arg("h_prev"), py::arg("out"), py::arg("rows"), py::arg("C"), py::arg("nslot"),
            py::arg("dtype"), py::arg("variant"), py::arg("store"),
            "Predict R_eff (variant: the code of tcpade.core.layout.VARIANT_TABLE), optionally write h_out = "
            "h_in + R_eff (out != 0; a non-finite element becomes h_in + R1) and store R_eff in "
            "slots[nslot-1] (h_in = 0: a zero input, not read); return the sums (tcpade.core.layout.SUMS).");
    mod.def("num_threads", []() { return omp_get_max_threads(); }, "OpenMP max threads.");
    mod.def(
        "layout",
        []() {
            py::dict d;
#define TC_PUT(name) d[#name] = name;
            TCL_LAYOUT(TC_PUT)
#undef TC_PUT
            return d;
        },
        "The tables compiled into the kernels (tcpade.core.layout.compiled_layout() of the build's layout.py).");
    mod.def("isa", []() { return std::string(isa().name); },
            "Instruction set of the kernels in use: sse2, avx2 or avx512 (TCPADE_CPU_ISA=sse2|avx2 lowers it).");
}

#else  // TC_KERNEL_NS defined: the kernel part
// =================================================================== kernel part
namespace {
namespace TC_KERNEL_NS {

TC_INLINE float as_f(uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
TC_INLINE uint32_t as_u(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}
// Branch-free, vectorisable predicates / NaN-propagating min and max (torch.minimum /
// torch.maximum return NaN when either operand is NaN; fminf/fmaxf would drop it).
TC_INLINE float abs_f(float v) { return as_f(as_u(v) & 0x7fffffffu); }
TC_INLINE int nonfinite_f(float v) { return (as_u(v) & 0x7f800000u) == 0x7f800000u; }
TC_INLINE float min_p(float a, float b) { return ((a < b) || (a != a)) ? a : b; }
TC_INLINE float max_p(float a, float b) { return ((a > b) || (a != a)) ? a : b; }

// exp(x) for the paper's argument x = -s_rate d / (mag + s_eps), which lies in
// [-2 s_rate (1 + tiny), 0] (s_rate <= 40 is asserted below) or is -inf or NaN:
// d = |r1 - r2| >= 0 and d <= fl(|r1| + |r2|) = 2 mag (if that sum overflows, mag = inf and
// x is -0 or NaN; if it is subnormal, x ~ -0), the denominator is > 0, and -s_rate d may
// overflow to -inf while mag is finite. Correct for every x >= -87
// (2^n stays a normal float), -inf -> 0, NaN -> NaN. Branch-free and vectorisable (libm's
// expf is a call per element without -ffast-math): Cephes' expf polynomial, within 1 ulp
// of the exact result (as torch's own exp).
TC_INLINE float exp_paper(float x) {
    const bool special = !(x >= -87.0f);  // NaN or -inf (or, never here, finite < -87)
    const float xc = special ? 0.0f : x;  // keeps the int conversion below defined
    const float fx = xc * 1.44269504088896341f;
    const float n = (fx + 12582912.0f) - 12582912.0f;
    const int32_t ni = (int32_t)n;
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * (r * r) + r + 1.0f;
    const float res = y * as_f((uint32_t)(ni + 127) << 23);
    const float res_special = x != x ? x : 0.0f;
    return special ? res_special : res;
}

// ---------------------------------------------------------------- storage dtypes
struct F32 {
    using S = float;
    static TC_INLINE float ld(S v) { return v; }
    static TC_INLINE S st(float v) { return v; }
    static TC_INLINE int bad(S v) { return nonfinite_f(v); }
};

struct BF16 {
    using S = uint16_t;
    static TC_INLINE float ld(S v) { return as_f((uint32_t)v << 16); }
    // Round to nearest even; NaN stays NaN (quiet bit set).
    static TC_INLINE S st(float v) {
        const uint32_t u = as_u(v);
        const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
        const uint32_t qnan = (u >> 16) | 0x0040u;
        const int32_t a = (int32_t)(u & 0x7fffffffu);
        return (S)(a > 0x7f800000 ? qnan : rounded);
    }
    static TC_INLINE int bad(S v) { return (v & 0x7f80u) == 0x7f80u; }
};

struct F16 {
    using S = uint16_t;
    // Exact half -> float (normals, subnormals, +-0, inf, NaN with payload).
    static TC_INLINE float ld(S h) {
        const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
        const int32_t em = h & 0x7fff;
        const uint32_t normal = ((uint32_t)em << 13) + (112u << 23);
        const uint32_t sub = as_u((float)em * 5.9604644775390625e-8f);  // em * 2^-24
        const uint32_t infnan = ((uint32_t)em << 13) | 0x7f800000u;
        const uint32_t r = em >= 0x7c00 ? infnan : (em < 0x0400 ? sub : normal);
        return as_f(r | sign);
    }
    // float -> half, round to nearest even, overflow -> inf, NaN -> quiet NaN,
    // correct subnormals (after F. Giesen's float_to_half_fast3_rtne, branch-free).
    static TC_INLINE S st(float v) {
        const uint32_t u = as_u(v);
        const uint32_t sign = (u >> 16) & 0x8000u;
        const int32_t a = (int32_t)(u & 0x7fffffffu);
        const int32_t o_big = a > 0x7f800000 ? 0x7e00 : 0x7c00;
        const int32_t o_sub = (int32_t)as_u(as_f((uint32_t)a) + 0.5f) - 0x3f000000;
        const int32_t odd = (a >> 13) & 1;
        const int32_t o_norm = (a + (int32_t)(0xc8000000u) /* (15-127)<<23 */ + 0xfff + odd) >> 13;
        const int32_t o = a >= (143 << 23) ? o_big : (a < (113 << 23) ? o_sub : o_norm);
        return (S)((uint32_t)o | sign);
    }
    static TC_INLINE int bad(S v) { return (v & 0x7c00u) == 0x7c00u; }
};

// Runs body(thread_sums, row, thread_buffer) for every row on an OpenMP team (static
// schedule: whole rows per thread) and reduces the per-thread sums in thread order, so
// the result is deterministic for a given thread count. Small problems run on one
// thread (a team costs more than it saves below ~32k elements).
template <class Body>
Sums parallel_rows(int64_t rows, int64_t C, int64_t buf_floats, Body body) {
    const int nt = omp_get_max_threads();
    std::vector<Sums> part((size_t)nt, Sums{});
#pragma omp parallel num_threads(nt) if (rows > 1 && rows * C >= 32768)
    {
        const int tid = omp_get_thread_num();
        std::vector<float> buf((size_t)(buf_floats > 0 ? buf_floats : 1));
        Sums acc{};
#pragma omp for schedule(static)
        for (int64_t i = 0; i < rows; ++i) body(acc, i, buf.data());
        part[(size_t)tid] = acc;
    }
    Sums tot{};
    for (const Sums& p : part)
        for (int k = 0; k < NSUMS; ++k) tot[k] += p[k];
    return tot;
}

// ---------------------------------------------------------------- update
// X: h_in is given; without it the input is zero (the output level): R = h_out (y - 0 is y,
// bit for bit), no h_in is read, and h_prev (if kept) is zeroed.
template <class D, bool PROBE, bool X>
Sums update_impl(const typename D::S* hin, const typename D::S* hout, typename D::S* ring,
                 const std::vector<int64_t>& slots, typename D::S* hprev, int64_t rows, int64_t C) {
    using S = typename D::S;
    const int64_t n = rows * C;
    const S* R1 = ring + slots[0] * n;
    const S* R2 = ring + slots[1] * n;
    S* W = ring + slots.back() * n;
    return parallel_rows(rows, C, 0, [&](Sums& acc, int64_t i, float*) {
        const int64_t o = i * C;
        const S* x = X ? hin + o : nullptr;
        const S* y = hout + o;
        const S* r1 = R1 + o;
        const S* r2 = R2 + o;
        S* w = W + o;
        double a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0;
        int cnt = 0;  // per row: C < 2^31 (checked at the binding)
#pragma omp simd reduction(+ : a0, a1, a2, a3, a4, cnt)
        for (int64_t j = 0; j < C; ++j) {
            const float r = X ? D::ld(y[j]) - D::ld(x[j]) : D::ld(y[j]);
            const float v1 = D::ld(r1[j]);
            const float d1 = v1 - D::ld(r2[j]);
            const float d2 = r - v1;
            a0 += (double)(d1 * d1);
            a1 += (double)(d2 * d2);
            a2 += (double)(d1 * d2);
            a4 += (double)(r * r);
            if constexpr (PROBE) {
                const float p = D::ld(w[j]);  // read before the write below
                const float e = p - r;
                a3 += (double)(e * e);
            }
            const S s = D::st(r);
            cnt += D::bad(s);
            w[j] = s;
        }
        acc[SUM_D11] += a0;
        acc[SUM_D22] += a1;
        acc[SUM_D12] += a2;
        acc[SUM_ERR2] += a3;
        acc[SUM_R2] += a4;
        acc[SUM_NONFINITE] += (double)cnt;
        if (hprev != nullptr && !X) std::memset(hprev + o, 0, (size_t)C * sizeof(S));  // +0 in every dtype
        if (hprev != nullptr && X && hprev + o != x) std::memcpy(hprev + o, x, (size_t)C * sizeof(S));
    });
}

template <class D>
Sums update_any(const typename D::S* hin, const typename D::S* hout, typename D::S* ring,
                const std::vector<int64_t>& slots, typename D::S* hprev, int64_t rows, int64_t C, bool probe) {
    if (hin == nullptr)
        return probe ? update_impl<D, true, false>(hin, hout, ring, slots, hprev, rows, C)
                     : update_impl<D, false, false>(hin, hout, ring, slots, hprev, rows, C);
    return probe ? update_impl<D, true, true>(hin, hout, ring, slots, hprev, rows, C)
                 : update_impl<D, false, true>(hin, hout, ring, slots, hprev, rows, C);
}

// ---------------------------------------------------------------- predict
// A row is processed in at most three passes over C elements:
//   1. paper: the main prediction into a float buffer (heavy math, own function; done
//      chunk by chunk, alternating with pass 3); rational: the row reductions (all of
//      them finish before any write of the row);
//   2. (rare) paper's second fallback, wavg over R1..R4, where pade and fb1 both fail;
//   3. one fused pass: main (linear / rational / reuse inline, paper from the buffer),
//      stage blend, input-change correction, sums, rounding, stores, non-finite count.
// float32 paper without store runs passes 1 and 3 as one (M_PAPER, see below).
// Inputs are read straight from their storage dtype in every pass (the second read of a
// row hits L1/L2), so there are no separate conversion passes.

// Paper main prediction up to the first fallback (fb1), in paper_elem; paper_main_row
// returns how many elements are still non-finite (both pade and fb1), which the caller
// replaces by wavg.
//
// Two exact shortcuts keep this compute-bound loop short (results are unchanged):
// * den = 1 - den_a*s with s in [0, 1] (or NaN) is >= 1 - den_a >= den_min (asserted
//   below), so the reference's |den| >= den_min clamp is the identity and is left out;
//   NaN stays NaN either way.
// * The trust region p = avg + max(min(p - avg, m), -m) uses plain selects instead of
//   NaN-propagating torch.maximum/minimum. Where they differ (p - avg or m NaN), pade is
//   NaN anyway: m NaN means d or mag NaN, hence s and beta NaN; p - avg NaN means avg
//   NaN (which reaches pade through (1 - beta) * avg, and 0 * NaN is NaN) or p NaN,
//   which with finite r1, r2 needs s NaN (num = +-inf at worst, |den| >= den_min).
//   Either way the element falls back to fb1 exactly as in the reference.

// One element of the paper's main prediction: pade, or fb1 where pade is not finite.
// both_bad: fb1 is not finite either (the caller then needs wavg).
static_assert(1.0f - PAPER_DEN_A >= PAPER_DEN_MIN && PAPER_DEN_A >= 0.0f, "den clamp is the identity");
static_assert(PAPER_S_RATE >= 0.0f && PAPER_S_RATE <= 40.0f, "exp_paper's argument stays in [-87, 0]");

TC_INLINE float paper_elem(float a, float b, int& both_bad) {
    const float d = abs_f(a - b);
    const float mag = 0.5f * (abs_f(a) + abs_f(b));
    const float s = exp_paper((-PAPER_S_RATE * d) / (mag + PAPER_S_EPS));
    const float num = (PAPER_NUM_R1 * s) * a - s * b;
    const float den = 1.0f - PAPER_DEN_A * s;
    float p = num / den;
    const float avg = PAPER_AVG_R1 * a + PAPER_AVG_R2 * b;
    const float h1 = PAPER_TRUST_D * d, h2 = PAPER_TRUST_MAG * mag;
    const float mm = h1 > h2 ? h1 : h2;
    float cl = p - avg;
    cl = cl < mm ? cl : mm;
    cl = cl > -mm ? cl : -mm;
    p = avg + cl;
    const float beta = PAPER_BETA_S * s + PAPER_BETA_0;
    const float pade = beta * p + (1.0f - beta) * avg;
    const float fb1 = a + PAPER_FB1 * (a - b);
    const int bad_p = nonfinite_f(pade);
    both_bad = bad_p & nonfinite_f(fb1);
    return bad_p ? fb1 : pade;
}

template <class D>
TC_NO_TRAPS int paper_main_row(const typename D::S* r1, const typename D::S* r2, float* m, int64_t C) {
    int nb = 0;
#pragma omp simd reduction(+ : nb)
    for (int64_t j = 0; j < C; ++j) {
        int both_bad;
        m[j] = paper_elem(D::ld(r1[j]), D::ld(r2[j]), both_bad);
        nb += both_bad;
    }
    return nb;
}

// What the fused pass computes as the main prediction.
// M_PAPER computes the paper's main inline (one pass); it is used without store only, so
// that a row needing the second fallback (wavg reads R3/R4, one of which is the write
// slot) can simply be redone with M_BUF.
enum MainKind { M_BLEND = 0, M_BUF = 1, M_LINEAR = 2, M_RATIONAL = 3, M_REUSE = 4, M_PAPER = 5 };

struct RowCoef {
    float c1, c2, w_main, g, lam1, lam2, lt1, lt2, b;  // b: the rational row's b1
};

template <class D>
using FusedFn = int (*)(const typename D::S*, const typename D::S*, const typename D::S*, const typename D::S*,
                        const float*, typename D::S*, typename D::S*, const RowCoef&, int64_t, Sums&);

// The fused pass over one row. x: h_in (X; without it the input is zero and x is not read:
// 0 + R_eff and 0 - h_prev round exactly as with a zero tensor), hp: h_prev (GAMMA), m: paper's
// main (M_BUF), w: the write slot (STORE), out: h_out (WOUT). Adds the row's sums to acc;
// returns (for M_PAPER) the number of elements that need wavg, in which case the row must be redone.
template <class D, int MAIN, bool GAMMA, bool STORE, bool WOUT, bool X>
TC_NO_TRAPS int fused_row(const typename D::S* x, const typename D::S* r1,
                                         const typename D::S* r2, const typename D::S* hp, const float* m,
                                         typename D::S* w, typename D::S* out, const RowCoef& k, int64_t C,
                                         Sums& acc) {
    using S = typename D::S;
    constexpr bool NEED_R2 = MAIN != M_REUSE || STORE;
    constexpr bool NEED_X = X && (GAMMA || WOUT);
    const float c1 = k.c1, c2 = k.c2, w_main = k.w_main, g = k.g;
    const float lam1 = k.lam1, lam2 = k.lam2, lt1 = k.lt1, lt2 = k.lt2, b = k.b;
    static_assert(MAIN != M_PAPER || !STORE, "M_PAPER is for store=False only");
    double a0 = 0, a1 = 0, a2 = 0, a4 = 0;
    int cnt = 0, nb = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a4, cnt, nb)
    for (int64_t j = 0; j < C; ++j) {
        const float v1 = D::ld(r1[j]);
        const float v2 = NEED_R2 ? D::ld(r2[j]) : 0.0f;
        float rh;
        if constexpr (MAIN == M_REUSE) {
            rh = v1;
        } else {
            const float blend = c1 * v1 + c2 * v2;
            if constexpr (MAIN == M_BLEND) {
                rh = blend;
            } else {
                float mv;
                if constexpr (MAIN == M_BUF) {
                    mv = m[j];
                } else if constexpr (MAIN == M_PAPER) {
                    int both_bad;
                    mv = paper_elem(v1, v2, both_bad);
                    nb += both_bad;
                } else if constexpr (MAIN == M_LINEAR) {
                    mv = lam1 * v2 + lam2 * v1;
                } else {  // M_RATIONAL: lin + b1 * lty with (y1, y2) = (R2, R1)
                    const float lin = lam1 * v2 + lam2 * v1;
                    const float lty = lt1 * v2 + lt2 * v1;
                    mv = lin + b * lty;
                }
                rh = blend + w_main * mv;
            }
        }
        const float xv = NEED_X ? D::ld(x[j]) : 0.0f;
        if constexpr (GAMMA) rh = rh + g * (xv - D::ld(hp[j]));
        if constexpr (STORE) {
            const float d1 = v1 - v2;
            const float d2 = rh - v1;
            a0 += (double)(d1 * d1);
            a1 += (double)(d2 * d2);
            a2 += (double)(d1 * d2);
        }
        a4 += (double)(rh * rh);
        const S sv = D::st(rh);
        int bad = D::bad(sv);
        if constexpr (WOUT) {
            // A non-finite h_out element becomes h_in + R1; the count keeps the raw one.
            const S o = D::st(xv + rh);
            const int bad_o = D::bad(o);
            bad |= bad_o;
            const S alt = D::st(xv + (std::isfinite(v1) ? v1 : 0.0f));  // a non-finite R1 contributes nothing
            out[j] = bad_o ? alt : o;
        }
        if constexpr (STORE) w[j] = sv;
        cnt += bad;
    }
    acc[SUM_D11] += a0;
    acc[SUM_D22] += a1;
    acc[SUM_D12] += a2;
    acc[SUM_R2] += a4;
    acc[SUM_NONFINITE] += (double)cnt;
    return nb;
}

template <class D, int MAIN, bool X>
FusedFn<D> pick_fused_for(bool gamma, bool store, bool wout) {
    if constexpr (MAIN == M_PAPER) {
        static constexpr FusedFn<D> tbl[4] = {
            &fused_row<D, MAIN, false, false, false, X>, &fused_row<D, MAIN, false, false, true, X>,
            &fused_row<D, MAIN, true, false, false, X>, &fused_row<D, MAIN, true, false, true, X>};
        return store ? nullptr : tbl[(gamma ? 2 : 0) + (wout ? 1 : 0)];
    } else {
        static constexpr FusedFn<D> tbl[8] = {
            &fused_row<D, MAIN, false, false, false, X>, &fused_row<D, MAIN, false, false, true, X>,
            &fused_row<D, MAIN, false, true, false, X>,  &fused_row<D, MAIN, false, true, true, X>,
            &fused_row<D, MAIN, true, false, false, X>,  &fused_row<D, MAIN, true, false, true, X>,
            &fused_row<D, MAIN, true, true, false, X>,   &fused_row<D, MAIN, true, true, true, X>,
        };
        return tbl[(gamma ? 4 : 0) + (store ? 2 : 0) + (wout ? 1 : 0)];
    }
}

template <class D, bool X>
FusedFn<D> pick_fused_x(int main, bool gamma, bool store, bool wout) {
    switch (main) {
        case M_BUF: return pick_fused_for<D, M_BUF, X>(gamma, store, wout);
        case M_PAPER: return pick_fused_for<D, M_PAPER, X>(gamma, store, wout);
        case M_LINEAR: return pick_fused_for<D, M_LINEAR, X>(gamma, store, wout);
        case M_RATIONAL: return pick_fused_for<D, M_RATIONAL, X>(gamma, store, wout);
        case M_REUSE: return pick_fused_for<D, M_REUSE, X>(gamma, store, wout);
        default: return pick_fused_for<D, M_BLEND, X>(gamma, store, wout);
    }
}

// x: h_in is given (false: a zero input, not read).
template <class D>
FusedFn<D> pick_fused(int main, bool gamma, bool store, bool wout, bool x) {
    return x ? pick_fused_x<D, true>(main, gamma, store, wout) : pick_fused_x<D, false>(main, gamma, store, wout);
}

// Rational pass 1: the per-row reductions, then b1 (clamped, kappa-rescaled) as float32.
template <class D, bool KAPPA_ON>
float rational_b1(const typename D::S* y0s, const typename D::S* y1s, const typename D::S* y2s, float alp0,
                  float alp1, float alp2, float at0, float at1, float at2, float lt1, float lt2, float bmax,
                  float kappa, int64_t C) {
    double st = 0, tt = 0, ll = 0, dd = 0;
#pragma omp simd reduction(+ : st, tt, ll, dd)
    for (int64_t j = 0; j < C; ++j) {
        const float y0 = D::ld(y0s[j]), y1 = D::ld(y1s[j]), y2 = D::ld(y2s[j]);
        const float Sv = alp0 * y0 + alp1 * y1 + alp2 * y2;
        const float Tv = at0 * y0 + at1 * y1 + at2 * y2;
        st += (double)(Sv * Tv);
        tt += (double)(Tv * Tv);
        if constexpr (KAPPA_ON) {
            const float lty = lt1 * y1 + lt2 * y2;
            const float df = y2 - y1;
            ll += (double)(lty * lty);
            dd += (double)(df * df);
        }
    }
    // The row sums are rounded to float32, as torch's float32 .sum(-1) would return them.
    float b = -(float)st / ((float)tt + 1e-30f);
    b = max_p(min_p(b, bmax), -bmax);
    if constexpr (KAPPA_ON) {
        const float lim = kappa * std::sqrt((float)dd);
        const float dev = abs_f(b) * std::sqrt((float)ll);
        if (dev > lim) b = b * (lim / dev);
    }
    return b;
}

template <class D>
Sums predict_impl(const typename D::S* hin, typename D::S* ring, typename D::S* hprev,
                  typename D::S* out, const PredictArgs& A) {
    using S = typename D::S;
    const int64_t C = A.C;
    const int64_t n = A.rows * C;
    const std::array<float, NCOEF>& cf = A.cf;
    const int var = A.variant;
    const bool store = A.store;
    const bool write_out = A.write_out && out != nullptr;
    const bool use_main = var != REUSE && cf[W_MAIN] != 0.0f;  // W_MAIN == 0: main not evaluated
    const bool gamma = hprev != nullptr && cf[GAMMA] != 0.0f;
    const S* R1 = ring + A.slots[0] * n;
    // Rational / linear with no weight on R2 (one residual stored: the prediction is R1): R2 is
    // not read, its terms read R1 with zero weight, so a stale non-finite value in R2's slot cannot
    // leak in through 0 * NaN (the reference's r2_unread).
    const bool r2_unread = (var == RATIONAL || var == LINEAR) && cf[LAM1] == 0.0f && cf[ALP0] == 0.0f &&
                           cf[ALP1] == 0.0f && cf[C2] == 0.0f;
    const S* R2 = ring + A.slots[r2_unread ? 0 : 1] * n;
    const S* R3 = ring + A.slots[2] * n;
    // Rational with a zero R3 weight (fewer than three stored residuals, or a degenerate
    // time grid): R3 is not read, so a stale non-finite value there cannot leak in through
    // 0 * NaN. Its terms then read R2 instead, with zero weight: a non-finite R2 makes the
    // prediction non-finite anyway, as it should.
    const S* R3fit = (cf[ALP0] == 0.0f) ? R2 : R3;
    const S* R4 = A.nslot >= 4 ? ring + A.slots[3] * n : nullptr;
    S* W = ring + A.slots[(size_t)A.nslot - 1] * n;

    // Scalars in float32; products of two coefficients are taken in float32 first, as the
    // reference does (cf[ALP0] * tau0 * y0 is (cf[ALP0] * tau0) * y0).
    RowCoef k0{};
    k0.c1 = cf[C1];
    k0.c2 = cf[C2];
    k0.w_main = cf[W_MAIN];
    k0.g = cf[GAMMA];
    k0.lam1 = cf[LAM1];
    k0.lam2 = cf[LAM2];
    k0.lt1 = cf[LAM1] * cf[TAU1];
    k0.lt2 = cf[LAM2] * cf[TAU2];
    const float alp0 = cf[ALP0], alp1 = cf[ALP1], alp2 = cf[ALP2];
    const float at0 = alp0 * cf[TAU0], at1 = alp1 * cf[TAU1], at2 = alp2 * cf[TAU2];
    const float bmax = cf[BMAX], kappa = cf[KAPPA];
    const float wv0 = cf[WAVG], wv1 = cf[WAVG + 1], wv2 = cf[WAVG + 2], wv3 = cf[WAVG + 3];


    int main_kind = M_BLEND;
    if (var == REUSE) main_kind = M_REUSE;
    else if (use_main) main_kind = var == PAPER ? M_BUF : var == LINEAR ? M_LINEAR : M_RATIONAL;
    // float32 paper without store: one fused pass (M_PAPER); a
    // row that needs the second fallback is redone in two passes (M_BUF). Not when h_out
    // overwrites h_in or h_prev in place (a redo must re-read them), and not for 16-bit
    // storage: there gcc vectorises the fused loop 32 lanes wide (u16 loads), spills, and
    // two passes are faster (bench/RESULTS.md).
    const bool paper_one_pass = std::is_same<D, F32>::value && main_kind == M_BUF && !store &&
                                !(write_out && ((const void*)out == (const void*)hin || out == hprev));
    const bool has_x = hin != nullptr;  // false: a zero input (the output level), never read
    const FusedFn<D> fused =
        pick_fused<D>(paper_one_pass ? (int)M_PAPER : main_kind, gamma, store, write_out, has_x);
    const FusedFn<D> fused_buf = main_kind == M_BUF ? pick_fused<D>(M_BUF, gamma, store, write_out, has_x) : nullptr;

    // h_out written in place over h_in while h_prev must receive the old h_in: keep a copy.
    const bool save_x = hprev != nullptr && hprev != hin && write_out && (const void*)out == (const void*)hin;
    constexpr int64_t PCH = 1024;  // paper two-pass chunk (faster than whole rows: bench/RESULTS.md)
    const int64_t mlen = main_kind == M_BUF ? (C < PCH ? C : PCH) : 0;
    const int64_t nbuf = mlen + (save_x ? C : 0);

    return parallel_rows(A.rows, C, nbuf, [&](Sums& acc, int64_t i, float* m) {
        const int64_t o = i * C;
        S* saved = save_x ? reinterpret_cast<S*>(m + mlen) : nullptr;
        if (save_x) std::memcpy(saved, hin + o, (size_t)C * sizeof(S));
        const S* xr = has_x ? hin + o : nullptr;
        const S* hp = gamma ? hprev + o : nullptr;
        S* ho = write_out ? out + o : nullptr;
        RowCoef k = k0;
        Sums rs{};
        bool done = false;
        if (paper_one_pass) done = fused(xr, R1 + o, R2 + o, hp, nullptr, W + o, ho, k, C, rs) == 0;
        if (!done) {
            if (main_kind == M_BUF) {
                // In chunks of PCH elements: the compute-bound main pass and the
                // memory-bound fused pass then alternate finely (better overlap).
                rs = Sums{};
                for (int64_t c0 = 0; c0 < C; c0 += PCH) {
                    const int64_t cn = C - c0 < PCH ? C - c0 : PCH;
                    const int64_t oc = o + c0;
                    const int nb = paper_main_row<D>(R1 + oc, R2 + oc, m, cn);
                    if (nb > 0) {  // second fallback, wavg over the history (rare: reads R3/R4)
                        for (int64_t j = 0; j < cn; ++j) {
                            if (!nonfinite_f(m[j])) continue;
                            float wv = wv0 * D::ld(R1[oc + j]) + wv1 * D::ld(R2[oc + j]);
                            wv = wv + wv2 * D::ld(R3[oc + j]);
                            if (R4) wv = wv + wv3 * D::ld(R4[oc + j]);
                            m[j] = wv;
                        }
                    }
                    fused_buf(xr ? xr + c0 : nullptr, R1 + oc, R2 + oc, hp ? hp + c0 : nullptr, m, W + oc,
                              ho ? ho + c0 : nullptr, k, cn, rs);
                }
            } else {
                if (main_kind == M_RATIONAL)
                    k.b = kappa > 0.0f
                              ? rational_b1<D, true>(R3fit + o, R2 + o, R1 + o, alp0, alp1, alp2, at0, at1, at2,
                                                     k0.lt1, k0.lt2, bmax, kappa, C)
                              : rational_b1<D, false>(R3fit + o, R2 + o, R1 + o, alp0, alp1, alp2, at0, at1, at2,
                                                      k0.lt1, k0.lt2, bmax, kappa, C);
                // All reads of R3 for this row are done: the write slot may be R3's.
                fused(xr, R1 + o, R2 + o, hp, m, W + o, ho, k, C, rs);
            }
        }
        for (int q = 0; q < NSUMS; ++q) acc[q] += rs[q];
        if (hprev != nullptr && !has_x)
            std::memset(hprev + o, 0, (size_t)C * sizeof(S));  // the zero input; +0 in every dtype
        else if (hprev != nullptr && hprev != hin)
            std::memcpy(hprev + o, save_x ? saved : hin + o, (size_t)C * sizeof(S));
    });
}

// ---------------------------------------------------------------- entry points
Sums run_update(int dtype, uintptr_t h_in, uintptr_t h_out, uintptr_t ring, const std::vector<int64_t>& slots,
                uintptr_t h_prev, int64_t rows, int64_t C, bool probe) {
    switch (dtype) {
        case 0: {
            auto p = [](uintptr_t v) { return reinterpret_cast<float*>(v); };
            return update_any<F32>(p(h_in), p(h_out), p(ring), slots, p(h_prev), rows, C, probe);
        }
        case 1: {
            auto p = [](uintptr_t v) { return reinterpret_cast<uint16_t*>(v); };
            return update_any<BF16>(p(h_in), p(h_out), p(ring), slots, p(h_prev), rows, C, probe);
        }
        default: {
            auto p = [](uintptr_t v) { return reinterpret_cast<uint16_t*>(v); };
            return update_any<F16>(p(h_in), p(h_out), p(ring), slots, p(h_prev), rows, C, probe);
        }
    }
}

Sums run_predict(int dtype, uintptr_t h_in, uintptr_t ring, uintptr_t h_prev, uintptr_t out, const PredictArgs& A) {
    switch (dtype) {
        case 0: {
            auto p = [](uintptr_t v) { return reinterpret_cast<float*>(v); };
            return predict_impl<F32>(p(h_in), p(ring), p(h_prev), p(out), A);
        }
        case 1: {
            auto p = [](uintptr_t v) { return reinterpret_cast<uint16_t*>(v); };
            return predict_impl<BF16>(p(h_in), p(ring), p(h_prev), p(out), A);
        }
        default: {
            auto p = [](uintptr_t v) { return reinterpret_cast<uint16_t*>(v); };
            return predict_impl<F16>(p(h_in), p(ring), p(h_prev), p(out), A);
        }
    }
}

}  // namespace TC_KERNEL_NS
}  // namespace
#endif  // TC_KERNEL_NS
