// Kernel parity test: every KernelTable function of every backend this machine can run
// (batchnorm::supported_isas()), for float, double, float16 and bfloat16, against plain float64 loops written here
// (an independent reference: it shares no code with the kernels). Sizes are awkward on purpose:
// every tail length of every vector width, zero sizes, runs with gaps between them (stride > len),
// row counts on both sides of the flush interval, shapes across the channels-last row tiles and
// column blocks. Outputs carry sentinel guard elements after the end and in the gaps, which must
// come back untouched (this catches stray writes without a sanitizer, e.g. under qemu); inputs,
// and a second copy of the outputs that are read back (column sums, in-place y), are allocated to
// their exact size, so AddressSanitizer sees any access past the end. No test framework: prints
// each failure (the first few), one `N passed, M failed` line, and exits non-zero on any failure.
//
//   x86:     g++ -std=c++17 -O2 -fsanitize=address,undefined -Icpp/include
//                tests/cpp/kernel_parity_test.cpp -o kernel_parity_test && ./kernel_parity_test
//   aarch64: .ci/neon.sh   (cross-compiled, run under qemu-aarch64)
//
// Tolerances. u is the unit roundoff of T (2^-24 float, 2^-53 double), u64 = 2^-53.
//  - Reductions sum terms t (x, x - shift, (x - shift)^2, dy, dy*(x - shift)). Forming a term costs
//    at most 2u relative; a lane of T holds at most kFlushVectors = 16 terms per accumulator (plus
//    one add joining two accumulators) before it is widened, exactly, to float64: at most 16u of
//    sum|t|; the float64 additions after that, in the kernel and in this reference, cost at most
//    n*u64 of sum|t| each for n terms. Bound: (18u + 2n*u64) * sum|t|. Allowed:
//    (32u + 2(n+1)*u64) * sum|t|, under 2x the bound. A lost or doubled lane, a wrong tail fill or
//    a misread element is off by about one |t|, millions of times this.
//  - Element-wise outputs, y = (x - s)*a + b (+ r) and gx = dy*k + (x - s)*m + q, take at most 5
//    roundings in T (fused or not), each at most u times mag = |(x - s)a| + |b| + |r| (resp.
//    |dy k| + |(x - s)m| + |q|). Allowed: (8u + 4u64) * mag. relu is 1-Lipschitz: same bound.
//  - Half storage (float16, bfloat16) computes in float (u above is float's) and rounds once more
//    on store: plus uh * mag, uh the half type's unit roundoff (2^-11, 2^-8). Their conversions
//    are checked bit for bit against half.hpp's scalar reference (test_conversions).
#include <batchnorm/dispatch.hpp>
#include <batchnorm/engine/plane_blocks.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using batchnorm::Isa;
using batchnorm::detail::KernelTable;
using batchnorm::detail::BlockReads;
using batchnorm::detail::Sums;
using batchnorm::detail::Writes;
using i64 = std::int64_t;

// Every way an apply kernel may write its output (streamed: non-temporal stores where the
// backend has them), each of which must give the same values.
constexpr Writes kAllWrites[] = {Writes::cached, Writes::prefetched, Writes::streamed};
std::string writes_tag(Writes writes) {
    return writes == Writes::cached ? "" : writes == Writes::prefetched ? " prefetched" : " streamed";
}

constexpr i64 kGuard = 16;        // past-the-end guard elements: the widest vector (AVX-512 float)
constexpr double kSentinel = -12345.5;  // exact in float and double; no kernel output equals it
constexpr double kU64 = std::numeric_limits<double>::epsilon() / 2;

using batchnorm::bfloat16;
using batchnorm::compute_t;
using batchnorm::float16;

template <class T>
constexpr double unit_roundoff() { return std::numeric_limits<T>::epsilon() / 2; }
template <> constexpr double unit_roundoff<float16>() { return 1.0 / 2048; }
template <> constexpr double unit_roundoff<bfloat16>() { return 1.0 / 256; }

// T is a storage type; sums and element-wise math run in compute_t<T>.
template <class T>
double sum_tol(double abs_sum, i64 n) {
    return (32 * unit_roundoff<compute_t<T>>() + 2.0 * double(n + 1) * kU64) * abs_sum;
}

template <class T>
double elem_tol(double mag) {
    const double store = std::is_same_v<T, compute_t<T>> ? 0.0 : unit_roundoff<T>();
    return (8 * unit_roundoff<compute_t<T>>() + store + 4 * kU64) * mag;
}

template <class T> const char* type_name();
template <> const char* type_name<float>() { return "float"; }
template <> const char* type_name<double>() { return "double"; }
template <> const char* type_name<float16>() { return "float16"; }
template <> const char* type_name<bfloat16>() { return "bfloat16"; }

struct Checker {
    i64 passed = 0, failed = 0;
    static constexpr i64 kMaxPrinted = 40;

    void check(bool ok, const std::string& where, const std::string& what) {
        if (ok) { ++passed; return; }
        if (failed < kMaxPrinted) std::fprintf(stderr, "FAIL %s: %s\n", where.c_str(), what.c_str());
        if (failed == kMaxPrinted) std::fprintf(stderr, "(further failures not printed)\n");
        ++failed;
    }
};

std::string fmt(const char* f, double a, double b, double c) {
    char buf[160];
    std::snprintf(buf, sizeof buf, f, a, b, c);
    return buf;
}

// A scalar reduction result against its reference.
void check_sum(Checker& ck, const std::string& where, const char* name, double got, double ref, double tol) {
    const bool ok = std::fabs(got - ref) <= tol;  // false for NaN
    ck.check(ok, where, std::string(name) + fmt(": got %.17g, expected %.17g, tolerance %.3g", got, ref, tol));
}

// Expected contents of an output buffer: ref where the kernel writes (mag for its tolerance),
// the sentinel everywhere else (gaps between runs and the guard after the end).
struct Expected {
    std::vector<double> ref, mag;
    std::vector<char> written;
    explicit Expected(i64 size) : ref(size_t(size), kSentinel), mag(size_t(size), 0.0), written(size_t(size), 0) {}
    void set(i64 i, double value, double magnitude) {
        ref[size_t(i)] = value;
        mag[size_t(i)] = magnitude;
        written[size_t(i)] = 1;
    }
};

// The expected output of an affine kernel with ReLU fused: max(value, 0) where written.
Expected relu_of(Expected e) {
    for (size_t i = 0; i < e.ref.size(); ++i)
        if (e.written[i]) e.ref[i] = std::max(e.ref[i], 0.0);
    return e;
}

template <class T>
void check_output(Checker& ck, const std::string& where, const char* name, const std::vector<T>& y, const Expected& e) {
    for (size_t i = 0; i < y.size(); ++i) {  // y may be shorter than e: an exact-size buffer, no guard
        const double got = double(y[i]);
        bool ok;
        if (e.written[i]) {
            ok = std::isnan(e.ref[i]) ? std::isnan(got) : std::fabs(got - e.ref[i]) <= elem_tol<T>(e.mag[i]);
        } else {
            ok = got == double(T(kSentinel));  // the sentinel as T stores it
        }
        if (!ok) {
            ck.check(false, where, std::string(name) + (e.written[i] ? "" : " wrote outside its range") +
                                       fmt(": element %.0f: got %.17g, expected %.17g", double(i), got, e.ref[i]));
            return;
        }
    }
    ck.check(true, where, name);
}

template <class T>
std::vector<T> random_vec(std::mt19937_64& rng, i64 n, double mean, double sd) {
    std::normal_distribution<double> normal(mean, sd);
    std::vector<T> v(static_cast<size_t>(n));
    for (T& x : v) x = T(normal(rng));
    return v;
}

template <class T>
std::vector<T> sentinel_vec(i64 n) { return std::vector<T>(size_t(n), T(kSentinel)); }

// What kernel(out) writes into a sentinel buffer of n values that begins on a cache line (where
// the row-major kernels stream a Writes::streamed output), copied out for check_output.
template <class T, class Kernel>
std::vector<T> written_at_line(i64 n, Kernel&& kernel) {
    std::vector<T> buf(size_t(n) + 64, T(kSentinel));
    const auto addr = reinterpret_cast<std::uintptr_t>(buf.data());
    const size_t skip = size_t((64 - addr % 64) % 64) / sizeof(T);  // heap blocks are aligned to T
    kernel(buf.data() + skip);
    return std::vector<T>(buf.begin() + std::ptrdiff_t(skip), buf.begin() + std::ptrdiff_t(skip + size_t(n)));
}

// Data means cycle through these: a large mean is where float statistics go wrong.
constexpr double kMeans[] = {0.0, 1.0, -50.0, 1e4, 1e6};

// float16 ends at 65504: its largest mean is 1e4.
template <class T>
double mean_at(int i) {
    const double m = kMeans[i % 5];
    return std::is_same_v<T, float16> ? std::min(m, 1e4) : m;
}

// ---- channels-first ------------------------------------------------------------------------

template <class T>
void test_cf(const KernelTable<T>& t, const std::string& tag, std::mt19937_64& rng, Checker& ck) {
    std::vector<i64> lens;
    for (i64 n = 0; n <= 70; ++n) lens.push_back(n);
    for (i64 n : {127, 128, 129, 511, 512, 513, 1031, 4099}) lens.push_back(n);  // across flushes
    int ci = 0;
    for (i64 len : lens) {
        for (i64 count : {1, 2, 3, 7}) {  // channel reductions persist across a channel's runs
            for (i64 gap : {0, 3}) {
                if (count == 1 && gap != 0) continue;
                const i64 stride = len + gap;
                const i64 size = count == 0 ? 0 : (count - 1) * stride + len;  // exact: no slack
                const double mean = mean_at<T>(ci++);
                const std::vector<T> x = random_vec<T>(rng, size, mean, 1.0);
                const std::vector<T> dy = random_vec<T>(rng, size, 0.0, 1.0);
                using C = compute_t<T>;
                const C shift = C(mean + 0.25 * std::normal_distribution<double>()(rng));
                const double s = double(shift);
                std::normal_distribution<double> coef(0.0, 2.0);
                const C alpha = C(coef(rng)), beta = C(coef(rng)), k = C(coef(rng)), m = C(coef(rng)), q = C(coef(rng));
                const std::string where = tag + " count=" + std::to_string(count) + " len=" + std::to_string(len) +
                                          " stride=" + std::to_string(stride) + fmt(" mean=%g", mean, 0, 0);

                double d1 = 0, ad1 = 0, d2 = 0, g = 0, ag = 0, gd = 0, agd = 0;
                Expected ey(size + kGuard), eg(size + kGuard);
                for (i64 r = 0; r < count; ++r) {
                    for (i64 i = r * stride; i < r * stride + len; ++i) {
                        const double xv = double(x[size_t(i)]), gv = double(dy[size_t(i)]), d = xv - s;
                        d1 += d; ad1 += std::fabs(d); d2 += d * d;
                        g += gv; ag += std::fabs(gv); gd += gv * d; agd += std::fabs(gv * d);
                        ey.set(i, d * double(alpha) + double(beta),
                               std::fabs(d * double(alpha)) + std::fabs(double(beta)));
                        eg.set(i, gv * double(k) + d * double(m) + double(q),
                               std::fabs(gv * double(k)) + std::fabs(d * double(m)) + std::fabs(double(q)));
                    }
                }
                const i64 n = count * len;
                // Runs past kPrefetchMaxBytes go in chunks when prefetching: it must not change a value.
                const bool prefetch = count % 2 == 1;

                const Sums dev = t.cf_dev(x.data(), count, len, stride, shift, prefetch);
                check_sum(ck, where, "cf_dev.first", dev.first, d1, sum_tol<T>(ad1, n));
                check_sum(ck, where, "cf_dev.second", dev.second, d2, sum_tol<T>(d2, n));
                const Sums dot = t.cf_dot(dy.data(), x.data(), count, len, stride, shift, prefetch);
                check_sum(ck, where, "cf_dot.first", dot.first, g, sum_tol<T>(ag, n));
                check_sum(ck, where, "cf_dot.second", dot.second, gd, sum_tol<T>(agd, n));

                for (const Writes writes : kAllWrites) {  // how the output is written must not change a value
                    const std::string at = where + writes_tag(writes);
                    std::vector<T> y = sentinel_vec<T>(size + kGuard);
                    t.cf_affine(x.data(), y.data(), count, len, stride, shift, alpha, beta, false, writes);
                    check_output(ck, at, "cf_affine", y, ey);
                    y = sentinel_vec<T>(size + kGuard);
                    t.cf_affine(x.data(), y.data(), count, len, stride, shift, alpha, beta, true, writes);
                    check_output(ck, at, "cf_affine relu", y, relu_of(ey));

                    std::vector<T> gx = sentinel_vec<T>(size + kGuard);
                    t.cf_grad(dy.data(), x.data(), gx.data(), count, len, stride, shift, k, m, q, writes);
                    check_output(ck, at, "cf_grad", gx, eg);
                }
            }
        }
    }
}

// ---- blocks of short planes (pb_*) ---------------------------------------------------------
// Every plane length up to the kernels' compile-time limit (kFlushVectors vectors of this
// backend's lanes), every tail past it and longer planes up to the engine's limit (the
// run_long paths), row counts on both sides of every flush interval, plane counts across
// kBlockPlanes, gaps between rows (stride > planes * len), and sums that start non-zero (the
// kernels add).

template <class T>
void test_pb(const KernelTable<T>& t, const std::string& tag, std::mt19937_64& rng, Checker& ck) {
    using C = compute_t<T>;
    const i64 max_short = batchnorm::detail::kFlushVectors * t.lanes;
    std::vector<i64> lens;
    for (i64 len = 1; len <= max_short; len += (len < 40 || len + 3 > max_short) ? 1 : 7) lens.push_back(len);
    for (i64 len = max_short + 1; len <= max_short + t.lanes; ++len) lens.push_back(len);
    for (i64 len : {max_short * 2 + 5, batchnorm::detail::kMaxBlockPlaneBytes / i64(sizeof(T))})
        if (len > max_short + t.lanes) lens.push_back(len);
    int ci = 0;
    for (i64 len : lens) {
        for (i64 rows : {1, 3, 5, 17}) {
            for (i64 planes : {1, 2, 33}) {
                const i64 gap = (len + rows) % 3 == 0 ? 0 : 5, stride = planes * len + gap;
                const i64 size = (rows - 1) * stride + planes * len;  // exact: no slack
                const double mean = mean_at<T>(ci++);
                const std::vector<T> x = random_vec<T>(rng, size, mean, 1.0);
                const std::vector<T> dy = random_vec<T>(rng, size, 0.0, 1.0);
                const std::vector<C> shift = random_vec<C>(rng, planes, mean, 0.25);
                const std::vector<C> a = random_vec<C>(rng, planes, 0.0, 2.0);
                const std::vector<C> b = random_vec<C>(rng, planes, 0.0, 2.0);
                const std::vector<C> c = random_vec<C>(rng, planes, 0.0, 2.0);
                const std::vector<double> start = random_vec<double>(rng, planes, 0.0, 1.0);
                const std::string where = tag + " pb rows=" + std::to_string(rows) + " planes=" +
                                          std::to_string(planes) + " len=" + std::to_string(len) +
                                          " stride=" + std::to_string(stride) + fmt(" mean=%g", mean, 0, 0);

                std::vector<double> d1(start), d2(start), ad1(start.size()), ad2(start.size());
                std::vector<double> g(start), gd(start), ag(start.size()), agd(start.size());
                Expected ey(size + kGuard), eg(size + kGuard);
                for (i64 r = 0; r < rows; ++r)
                    for (i64 j = 0; j < planes; ++j) {
                        const size_t u = size_t(j);
                        for (i64 i = r * stride + j * len; i < r * stride + (j + 1) * len; ++i) {
                            const double xv = double(x[size_t(i)]), gv = double(dy[size_t(i)]);
                            const double d = xv - double(shift[u]);
                            d1[u] += d; ad1[u] += std::fabs(d); d2[u] += d * d; ad2[u] += d * d;
                            g[u] += gv; ag[u] += std::fabs(gv); gd[u] += gv * d; agd[u] += std::fabs(gv * d);
                            ey.set(i, d * double(a[u]) + double(b[u]), std::fabs(d * double(a[u])) + std::fabs(double(b[u])));
                            eg.set(i, gv * double(a[u]) + d * double(b[u]) + double(c[u]),
                                   std::fabs(gv * double(a[u])) + std::fabs(d * double(b[u])) + std::fabs(double(c[u])));
                        }
                    }
                const i64 n = rows * len;
                // every order of the reductions gives the sums (prefetching must not change a value)
                for (const BlockReads reads : {BlockReads::resident, BlockReads::streamed, BlockReads::prefetched}) {
                    std::vector<double> s1(start), s2(start);
                    t.pb_dev(x.data(), rows, stride, planes, len, shift.data(), s1.data(), s2.data(), reads);
                    std::vector<double> t1(start), t2(start);
                    t.pb_dot(dy.data(), x.data(), rows, stride, planes, len, shift.data(), t1.data(), t2.data(), reads);
                    for (i64 j = 0; j < planes; ++j) {
                        const size_t u = size_t(j);
                        const std::string at = where + " reads=" + std::to_string(int(reads)) + " plane=" + std::to_string(j);
                        const double s0 = std::fabs(start[u]);
                        check_sum(ck, at, "pb_dev.first", s1[u], d1[u], sum_tol<T>(ad1[u] + s0, n));
                        check_sum(ck, at, "pb_dev.second", s2[u], d2[u], sum_tol<T>(ad2[u] + s0, n));
                        check_sum(ck, at, "pb_dot.first", t1[u], g[u], sum_tol<T>(ag[u] + s0, n));
                        check_sum(ck, at, "pb_dot.second", t2[u], gd[u], sum_tol<T>(agd[u] + s0, n));
                    }
                }
                for (const Writes writes : kAllWrites) {  // how the output is written must not change a value
                    const std::string at = where + writes_tag(writes);
                    std::vector<T> y = sentinel_vec<T>(size + kGuard);
                    t.pb_affine(x.data(), y.data(), rows, stride, planes, len, shift.data(), a.data(), b.data(), false,
                                writes);
                    check_output(ck, at, "pb_affine", y, ey);
                    y = sentinel_vec<T>(size + kGuard);
                    t.pb_affine(x.data(), y.data(), rows, stride, planes, len, shift.data(), a.data(), b.data(), true,
                                writes);
                    check_output(ck, at, "pb_affine relu", y, relu_of(ey));
                    std::vector<T> gx = sentinel_vec<T>(size + kGuard);
                    t.pb_grad(dy.data(), x.data(), gx.data(), rows, stride, planes, len, shift.data(), a.data(),
                              b.data(), c.data(), writes);
                    check_output(ck, at, "pb_grad", gx, eg);
                }
            }
        }
    }
}

// ---- whole planes, eval (rows_affine) ------------------------------------------------------

template <class T>
void test_rows(const KernelTable<T>& t, const std::string& tag, std::mt19937_64& rng, Checker& ck) {
    int ci = 0;
    for (i64 len = 0; len <= 70; ++len) {
        for (i64 planes : {1, 2, 7}) {
            const i64 channels = 3, first = (len + planes) % channels, size = planes * len;
            const double mean = mean_at<T>(ci++);
            const std::vector<T> x = random_vec<T>(rng, size, mean, 1.0);
            const std::vector<T> res = random_vec<T>(rng, size, 0.0, 1.0);
            using C = compute_t<T>;
            const std::vector<C> shift = random_vec<C>(rng, channels, mean, 0.25);
            const std::vector<C> alpha = random_vec<C>(rng, channels, 0.0, 2.0);
            const std::vector<C> beta = random_vec<C>(rng, channels, 0.0, 2.0);
            for (int variant = 0; variant < 4; ++variant) {
                const bool residual = variant & 1, relu = variant & 2;
                const std::string where = tag + " planes=" + std::to_string(planes) + " len=" + std::to_string(len) +
                                          " first_channel=" + std::to_string(first) + fmt(" mean=%g", mean, 0, 0) +
                                          (residual ? " residual" : "") + (relu ? " relu" : "");
                Expected e(size + kGuard);
                for (i64 p = 0; p < planes; ++p) {
                    const size_t c = size_t((first + p) % channels);
                    for (i64 i = p * len; i < (p + 1) * len; ++i) {
                        const double d = double(x[size_t(i)]) - double(shift[c]);
                        const double r = residual ? double(res[size_t(i)]) : 0.0;
                        double v = d * double(alpha[c]) + double(beta[c]) + r;
                        if (relu) v = std::max(v, 0.0);
                        e.set(i, v, std::fabs(d * double(alpha[c])) + std::fabs(double(beta[c])) + std::fabs(r));
                    }
                }
                for (const Writes writes : kAllWrites) {
                    std::vector<T> y = sentinel_vec<T>(size + kGuard);
                    t.rows_affine(x.data(), residual ? res.data() : nullptr, y.data(), planes, len, first, channels,
                                  shift.data(), alpha.data(), beta.data(), relu, writes);
                    check_output(ck, where + writes_tag(writes), "rows_affine", y, e);
                }
            }
        }
    }
}

// ---- channels-last -------------------------------------------------------------------------

template <class T>
void test_cl(const KernelTable<T>& t, const std::string& tag, std::mt19937_64& rng, Checker& ck) {
    // Every rows x cols in 0..40 (and 64, 100) x 0..70, plus shapes that cross the kernels' L1 row
    // tiles (32 KiB of rows), span several column blocks, and (2064, 2083) several of the apply
    // kernels' 1024-column chunks with factors in pair order (kernel_bodies.inl, with_pair_columns).
    std::vector<i64> row_counts;
    for (i64 r = 0; r <= 40; ++r) row_counts.push_back(r);
    row_counts.insert(row_counts.end(), {64, 100});
    std::vector<std::pair<i64, i64>> shapes;
    for (i64 rows : row_counts)
        for (i64 cols = 0; cols <= 70; ++cols) shapes.emplace_back(rows, cols);
    for (auto rc : {std::pair<i64, i64>{300, 13}, {300, 64}, {300, 70}, {150, 127}, {150, 128}, {150, 129},
                    {80, 257}, {40, 1031}, {9, 2064}, {12, 2083}})
        shapes.push_back(rc);
    int ci = 0;
    for (const auto& shape : shapes) {
        const i64 rows = shape.first, cols = shape.second;  // not a structured binding: lambdas capture these
        const i64 size = rows * cols;
        const double mean = mean_at<T>(ci++);
        const std::vector<T> x = random_vec<T>(rng, size, mean, 1.0);
        const std::vector<T> dy = random_vec<T>(rng, size, 0.0, 1.0);
        const std::vector<T> res = random_vec<T>(rng, size, 0.0, 1.0);
        using C = compute_t<T>;
        const std::vector<C> shift = random_vec<C>(rng, cols, mean, 0.25);
        const std::vector<C> alpha = random_vec<C>(rng, cols, 0.0, 2.0), beta = random_vec<C>(rng, cols, 0.0, 2.0);
        const std::vector<C> k = random_vec<C>(rng, cols, 0.0, 2.0), m = random_vec<C>(rng, cols, 0.0, 2.0),
                             q = random_vec<C>(rng, cols, 0.0, 2.0);
        // Column sums start non-zero (the kernels add into them) and carry a guard after cols.
        const std::vector<double> init = random_vec<double>(rng, cols, 0.0, 10.0);
        const std::string where = tag + " rows=" + std::to_string(rows) + " cols=" + std::to_string(cols) +
                                  fmt(" mean=%g", mean, 0, 0);

        std::vector<double> sx(size_t(cols), 0), ax(size_t(cols), 0), d1(size_t(cols), 0), ad1(size_t(cols), 0),
            d2(size_t(cols), 0), g(size_t(cols), 0), ag(size_t(cols), 0), gd(size_t(cols), 0), agd(size_t(cols), 0);
        Expected eg(size + kGuard);
        for (i64 r = 0; r < rows; ++r) {
            for (i64 j = 0; j < cols; ++j) {
                const size_t i = size_t(r * cols + j), c = size_t(j);
                const double xv = double(x[i]), gv = double(dy[i]), d = xv - double(shift[c]);
                sx[c] += xv; ax[c] += std::fabs(xv);
                d1[c] += d; ad1[c] += std::fabs(d); d2[c] += d * d;
                g[c] += gv; ag[c] += std::fabs(gv); gd[c] += gv * d; agd[c] += std::fabs(gv * d);
                eg.set(i64(i), gv * double(k[c]) + d * double(m[c]) + double(q[c]),
                       std::fabs(gv * double(k[c])) + std::fabs(d * double(m[c])) + std::fabs(double(q[c])));
            }
        }

        // One reduction output: init + column sums. Each reduction runs twice: into a buffer with
        // a guard after cols, which must stay -0.0 (the tail lanes a kernel must not add hold
        // exactly +0, and -0.0 + +0 = +0 shows), and into an exact-size buffer for ASan.
        auto check_cols = [&](const char* name, const std::vector<double>& got, const std::vector<double>& ref,
                              const std::vector<double>& abs_sum) {
            for (i64 j = 0; j < i64(got.size()); ++j) {
                const size_t c = size_t(j);
                if (j >= cols) {
                    if (!(got[c] == 0.0 && std::signbit(got[c]))) {
                        ck.check(false, where, std::string(name) + " wrote past cols" +
                                                   fmt(" at column %.0f: %.17g (the guard must stay -0.0)", double(j), got[c], 0));
                        return;
                    }
                    continue;
                }
                const double expected = init[c] + ref[c], tol = sum_tol<T>(std::fabs(init[c]) + abs_sum[c], rows);
                if (!(std::fabs(got[c] - expected) <= tol)) {
                    ck.check(false, where, std::string(name) +
                                               fmt(" column %.0f: got %.17g, expected %.17g", double(j), got[c], expected));
                    return;
                }
            }
            ck.check(true, where, name);
        };
        for (i64 guard : {kGuard, i64(0)}) {
            auto start = [&]() {
                std::vector<double> v(size_t(cols + guard), -0.0);
                for (i64 j = 0; j < cols; ++j) v[size_t(j)] = init[size_t(j)];
                return v;
            };
            std::vector<double> o1 = start(), o2 = start();
            t.cl_sum(x.data(), rows, cols, cols, o1.data());
            check_cols("cl_sum", o1, sx, ax);

            // A few rows at a time (resident, streamed), or row by row in page-wide chunks (prefetched).
            for (const BlockReads reads : {BlockReads::resident, BlockReads::prefetched}) {
                const std::string order = reads == BlockReads::prefetched ? " in order" : "";
                o1 = start(); o2 = start();
                t.cl_dev(x.data(), rows, cols, cols, shift.data(), o1.data(), o2.data(), reads);
                check_cols(("cl_dev.s1" + order).c_str(), o1, d1, ad1);
                check_cols(("cl_dev.s2" + order).c_str(), o2, d2, d2);

                o1 = start(); o2 = start();
                t.cl_dot(dy.data(), x.data(), rows, cols, cols, shift.data(), o1.data(), o2.data(), reads);
                check_cols(("cl_dot.sdy" + order).c_str(), o1, g, ag);
                check_cols(("cl_dot.sdyx" + order).c_str(), o2, gd, agd);
            }
        }

        for (int variant = 0; variant < 4; ++variant) {
            const bool residual = variant & 1, relu = variant & 2;
            Expected e(size + kGuard);
            for (i64 r = 0; r < rows; ++r) {
                for (i64 j = 0; j < cols; ++j) {
                    const size_t i = size_t(r * cols + j), c = size_t(j);
                    const double d = double(x[i]) - double(shift[c]), rv = residual ? double(res[i]) : 0.0;
                    double v = d * double(alpha[c]) + double(beta[c]) + rv;
                    if (relu) v = std::max(v, 0.0);
                    e.set(i64(i), v, std::fabs(d * double(alpha[c])) + std::fabs(double(beta[c])) + std::fabs(rv));
                }
            }
            const std::string w = where + (residual ? " residual" : "") + (relu ? " relu" : "");
            std::vector<T> y = sentinel_vec<T>(size + kGuard);
            t.cl_affine(x.data(), residual ? res.data() : nullptr, y.data(), rows, cols, cols, shift.data(),
                        alpha.data(), beta.data(), relu, Writes::cached);
            check_output(ck, w, "cl_affine", y, e);
            for (const Writes writes : kAllWrites) {  // rows of whole lines stream from a line boundary
                y = written_at_line<T>(size + kGuard, [&](T* out) {
                    t.cl_affine(x.data(), residual ? res.data() : nullptr, out, rows, cols, cols, shift.data(),
                                alpha.data(), beta.data(), relu, writes);
                });
                check_output(ck, w + " at a line" + writes_tag(writes), "cl_affine", y, e);
            }

            // In place (y == x), as `out=x` does, in an exact-size buffer: ASan sees any access past it.
            std::vector<T> z = x;
            t.cl_affine(z.data(), residual ? res.data() : nullptr, z.data(), rows, cols, cols, shift.data(),
                        alpha.data(), beta.data(), relu, Writes::streamed);
            check_output(ck, w + " in-place", "cl_affine", z, e);
        }

        std::vector<T> gx = sentinel_vec<T>(size + kGuard);
        t.cl_grad(dy.data(), x.data(), gx.data(), rows, cols, cols, shift.data(), k.data(), m.data(), q.data(),
                  Writes::cached);
        check_output(ck, where, "cl_grad", gx, eg);
        for (const Writes writes : kAllWrites) {
            gx = written_at_line<T>(size + kGuard, [&](T* out) {
                t.cl_grad(dy.data(), x.data(), out, rows, cols, cols, shift.data(), k.data(), m.data(), q.data(),
                          writes);
            });
            check_output(ck, where + " at a line" + writes_tag(writes), "cl_grad", gx, eg);
        }
    }
}

// ---- rows with per-element weight and bias (layer norm), column sums ---------------------------

template <class T>
void test_row_params(const KernelTable<T>& t, const std::string& tag, std::mt19937_64& rng, Checker& ck) {
    using C = compute_t<T>;  // per-element parameters and scalars
    std::vector<i64> lens;
    for (i64 n = 0; n <= 70; ++n) lens.push_back(n);
    for (i64 n : {127, 128, 129, 1031, 4099}) lens.push_back(n);
    int ci = 0;
    for (i64 n : lens) {
        const double mean = mean_at<T>(ci++);
        const std::vector<T> x = random_vec<T>(rng, n, mean, 1.0), r = random_vec<T>(rng, n, 0.0, 1.0);
        const std::vector<T> dy = random_vec<T>(rng, n, 0.0, 1.0);
        const std::vector<C> w = random_vec<C>(rng, n, 1.0, 0.5), b = random_vec<C>(rng, n, 0.0, 1.0);
        std::normal_distribution<double> coef(0.0, 2.0);
        const C shift = C(mean + 0.25 * coef(rng)), scale = C(coef(rng)), offset = C(coef(rng));
        const C k = C(coef(rng)), m = C(coef(rng)), q = C(coef(rng));
        const double s = double(shift);
        const std::string where = tag + " n=" + std::to_string(n) + fmt(" mean=%g", mean, 0, 0);
        Expected ea(n + kGuard);
        for (i64 i = 0; i < n; ++i)
            ea.set(i, double(x[size_t(i)]) + double(r[size_t(i)]), std::fabs(double(x[size_t(i)])) + std::fabs(double(r[size_t(i)])));
        std::vector<T> out = sentinel_vec<T>(n + kGuard);
        t.add(x.data(), r.data(), out.data(), n);
        check_output(ck, where, "add", out, ea);
        for (int variant = 0; variant < 4; ++variant) {
            const C* wp = variant & 1 ? w.data() : nullptr;
            const C* bp = variant & 2 ? b.data() : nullptr;
            const std::string wv = where + (wp ? " w" : "") + (bp ? " b" : "");
            Expected ey(n + kGuard), eg(n + kGuard);
            double g1 = 0, ag1 = 0, g2 = 0, ag2 = 0;
            for (i64 i = 0; i < n; ++i) {
                const size_t u = size_t(i);
                const double d = double(x[u]) - s, wi = wp ? double(w[u]) : 1.0, bi = bp ? double(b[u]) : 0.0;
                const double inner = d * double(scale) + double(offset);
                ey.set(i, inner * wi + bi, (std::fabs(d * double(scale)) + std::fabs(double(offset))) * std::fabs(wi) + std::fabs(bi));
                const double g = double(dy[u]) * wi;
                g1 += g; ag1 += std::fabs(g); g2 += g * d; ag2 += std::fabs(g * d);
                eg.set(i, g * double(k) + d * double(m) + double(q),
                       std::fabs(g * double(k)) + std::fabs(d * double(m)) + std::fabs(double(q)));
            }
            for (const Writes writes : kAllWrites) {
                std::vector<T> y = sentinel_vec<T>(n + kGuard);
                t.row_scale(x.data(), y.data(), n, shift, scale, offset, wp, bp, writes);
                t.fence();  // the row kernels leave streamed stores to their callers to fence
                check_output(ck, wv + writes_tag(writes), "row_scale", y, ey);
            }
            if (bp) continue;  // row_wdot and row_wgrad take no bias
            const Sums dot = t.row_wdot(dy.data(), x.data(), wp, n, shift);
            check_sum(ck, wv, "row_wdot.first", dot.first, g1, sum_tol<T>(ag1, n) * 2);
            check_sum(ck, wv, "row_wdot.second", dot.second, g2, sum_tol<T>(ag2, n) * 2);
            {  // the same sums, and the row's column terms added into 2n lanes (a guard after them)
                std::vector<C> lanes = random_vec<C>(rng, 2 * n + kGuard, 0.0, 4.0);
                const std::vector<C> before = lanes;
                const Sums both = t.row_wdot_cols(dy.data(), x.data(), wp, n, shift, scale, lanes.data());
                check_sum(ck, wv, "row_wdot_cols.first", both.first, g1, sum_tol<T>(ag1, n) * 2);
                check_sum(ck, wv, "row_wdot_cols.second", both.second, g2, sum_tol<T>(ag2, n) * 2);
                bool ok = true;
                for (i64 i = 0; i < 2 * n + kGuard && ok; ++i) {
                    const size_t u = size_t(i), j = size_t(i % std::max<i64>(n, 1));
                    const double term = i < n       ? double(dy[j])
                                        : i < 2 * n ? double(dy[j]) * ((double(x[j]) - s) * double(scale))
                                                    : 0.0;
                    const double want = double(before[u]) + term;
                    // an add, or a subtract, a multiply and an fma, in C; the guard untouched
                    const double tol = i < 2 * n ? 4 * unit_roundoff<C>() * (std::fabs(double(before[u])) + std::fabs(term)) : 0.0;
                    ok = std::fabs(double(lanes[u]) - want) <= tol;
                    if (!ok) ck.check(false, wv, fmt("row_wdot_cols lane %.0f: got %.17g, expected %.17g", double(i), double(lanes[u]), want));
                }
                if (ok) ck.check(true, wv, "row_wdot_cols lanes");
            }
            for (const Writes writes : kAllWrites) {
                std::vector<T> gx = sentinel_vec<T>(n + kGuard);
                t.row_wgrad(dy.data(), x.data(), wp, gx.data(), n, shift, k, m, q, writes);
                t.fence();  // the row kernels leave streamed stores to their callers to fence
                check_output(ck, wv + writes_tag(writes), "row_wgrad", gx, eg);
            }
        }
    }
    // cols_dot over a block of columns of wider rows (ld > cols), adding into non-zero sums.
    for (const auto& [rows, cols] : std::vector<std::pair<i64, i64>>{{0, 5}, {1, 1}, {3, 17}, {17, 33}, {40, 70},
                                                                     {33, 300}, {5, 1031}}) {
        const i64 ld = cols + 3, size = rows == 0 ? 0 : (rows - 1) * ld + cols;
        const double mean = mean_at<T>(ci++);
        const std::vector<T> x = random_vec<T>(rng, size, mean, 1.0), dy = random_vec<T>(rng, size, 0.0, 1.0);
        const std::vector<C> shift = random_vec<C>(rng, rows, mean, 0.25), scale = random_vec<C>(rng, rows, 0.0, 2.0);
        const std::vector<double> init = random_vec<double>(rng, cols, 0.0, 10.0);
        std::vector<double> sdy = init, sdyx = init;
        t.cols_dot(dy.data(), x.data(), rows, cols, ld, shift.data(), scale.data(), sdy.data(), sdyx.data());
        const std::string where = tag + " cols_dot rows=" + std::to_string(rows) + " cols=" + std::to_string(cols);
        bool ok = true;
        for (i64 j = 0; j < cols && ok; ++j) {
            double g = 0, ag = 0, gd = 0, agd = 0;
            for (i64 r = 0; r < rows; ++r) {
                const size_t i = size_t(r * ld + j);
                const double gv = double(dy[i]), t2 = gv * (double(x[i]) - double(shift[size_t(r)])) * double(scale[size_t(r)]);
                g += gv; ag += std::fabs(gv); gd += t2; agd += std::fabs(t2);
            }
            const size_t c = size_t(j);
            ok = std::fabs(sdy[c] - init[c] - g) <= sum_tol<T>(std::fabs(init[c]) + ag, rows) &&
                 std::fabs(sdyx[c] - init[c] - gd) <= sum_tol<T>(std::fabs(init[c]) + agd, rows) * 2;
            if (!ok) ck.check(false, where, fmt("column %.0f: got %.17g, expected %.17g", double(j), sdyx[c], init[c] + gd));
        }
        if (ok) ck.check(true, where, "cols_dot");
    }
    // Channels-last kernels on a block of columns (ld > cols): nothing outside the block is touched.
    for (const auto& [rows, cols] : std::vector<std::pair<i64, i64>>{{5, 3}, {20, 17}, {70, 40}}) {
        const i64 ld = cols + 5, size = rows * ld;
        const std::vector<T> x = random_vec<T>(rng, size, 3.0, 1.0);
        const std::vector<C> shift = random_vec<C>(rng, cols, 3.0, 0.25), alpha = random_vec<C>(rng, cols, 0.0, 2.0),
                             beta = random_vec<C>(rng, cols, 0.0, 2.0);
        Expected e(size + kGuard);
        for (i64 r = 0; r < rows; ++r)
            for (i64 j = 0; j < cols; ++j) {
                const double d = double(x[size_t(r * ld + j)]) - double(shift[size_t(j)]);
                e.set(r * ld + j, d * double(alpha[size_t(j)]) + double(beta[size_t(j)]),
                      std::fabs(d * double(alpha[size_t(j)])) + std::fabs(double(beta[size_t(j)])));
            }
        std::vector<T> y = sentinel_vec<T>(size + kGuard);
        t.cl_affine(x.data(), nullptr, y.data(), rows, cols, ld, shift.data(), alpha.data(), beta.data(), false,
                    Writes::cached);
        check_output(ck, tag + " ld=" + std::to_string(ld) + " cols=" + std::to_string(cols), "cl_affine block", y, e);
    }
}

// ---- relu keeps NaN -------------------------------------------------------------------------
// A NaN input (or residual) must come out NaN through the fused relu, as std::max(NaN, 0) in the
// scalar reference backend and torch.relu do, not be flushed to 0. Checked in every lane position.

template <class T>
void test_relu_nan(const KernelTable<T>& t, const std::string& tag, Checker& ck) {
    using C = compute_t<T>;
    const T nan = T(std::numeric_limits<C>::quiet_NaN());
    for (i64 cols : {1, 5, 19, 37}) {
        for (int variant = 0; variant < 2; ++variant) {
            const bool nan_in_residual = variant == 1;
            const i64 rows = 2, size = rows * cols;
            std::vector<T> x(size_t(size), T(C(1))), res(size_t(size), T(C(0.5)));
            std::vector<C> shift(size_t(cols), C(0)), alpha(size_t(cols), C(1)), beta(size_t(cols), C(0));
            Expected e(size + kGuard);
            for (i64 i = 0; i < size; ++i) {
                const bool is_nan = i % 3 == 1;
                if (is_nan) (nan_in_residual ? res : x)[size_t(i)] = nan;
                e.set(i, is_nan ? double(nan) : 1.5, 2.0);
            }
            const std::string where =
                tag + " cols=" + std::to_string(cols) + (nan_in_residual ? " NaN residual" : " NaN x");
            std::vector<T> y = sentinel_vec<T>(size + kGuard);
            t.cl_affine(x.data(), res.data(), y.data(), rows, cols, cols, shift.data(), alpha.data(), beta.data(), true,
                        Writes::cached);
            check_output(ck, where, "cl_affine relu NaN", y, e);
            // The same data as `rows` planes of one channel each.
            y = sentinel_vec<T>(size + kGuard);
            t.rows_affine(x.data(), res.data(), y.data(), rows, cols, 0, 1, shift.data(), alpha.data(), beta.data(),
                          true, Writes::cached);
            check_output(ck, where, "rows_affine relu NaN", y, e);
        }
    }
}

// ---- half conversions, bit for bit --------------------------------------------------------
// Widening: every one of the 65536 bit patterns through y = (x - 0)*1 + (-0), which is x exactly,
// must come back with the same bits (a NaN as a NaN). Narrowing: y = (1 - 0)*a + 0 is a exactly
// (a a float per column), so y's bits must be half.hpp's rounding of a: random floats of every
// magnitude, and ties (the discarded bits exactly half an ulp) where only round-to-even is right.

template <class T>
void test_conversions(const KernelTable<T>& t, const std::string& tag, std::mt19937_64& rng, Checker& ck) {
    using C = compute_t<T>;
    const i64 n = 65536;
    std::vector<T> x(static_cast<size_t>(n));
    for (i64 i = 0; i < n; ++i) x[size_t(i)] = T::from_bits(std::uint16_t(i));
    i64 bad = 0;
    for (const Writes writes : kAllWrites) {  // non-temporal stores narrow as plain ones do
        std::vector<T> y = sentinel_vec<T>(n + 3);
        t.cf_affine(x.data(), y.data(), 1, n - 3, 0, C(0), C(1), C(-0.0), false, writes);  // a tail, then 3 by cl
        const std::vector<C> zero(3, C(0)), one(3, C(1)), minus_zero(3, C(-0.0));
        t.cl_affine(x.data() + n - 3, nullptr, y.data() + n - 3, 1, 3, 3, zero.data(), one.data(), minus_zero.data(),
                    false, Writes::cached);
        bad = 0;
        for (i64 i = 0; i < n; ++i) {
            const bool nan = std::isnan(float(x[size_t(i)]));
            if (nan ? !std::isnan(float(y[size_t(i)])) : y[size_t(i)].bits != x[size_t(i)].bits) ++bad;
        }
        ck.check(bad == 0 && y[size_t(n)].bits == T(kSentinel).bits, tag + writes_tag(writes),
                 fmt("widen: %.0f of 65536 patterns changed", double(bad), 0, 0));
    }

    const i64 cols = 4099;
    std::vector<C> a(static_cast<size_t>(cols));
    std::uniform_int_distribution<std::uint32_t> bits;
    const int drop = std::is_same_v<T, float16> ? 13 : 16;  // float mantissa bits a half type drops
    for (i64 j = 0; j < cols; ++j) {
        std::uint32_t u = bits(rng);
        if (j % 4 == 1) u = (u & ~((1u << drop) - 1)) | (1u << (drop - 1));  // a tie
        if (j % 4 == 2) u = (u & 0x80FFFFFFu) | ((100u + (u >> 24) % 60) << 23);  // near half's range
        if (j % 16 == 3) u &= 0x807FFFFFu;  // a float denormal (vcvtneps2bf16 would flush it to zero)
        a[size_t(j)] = batchnorm::detail::bits_float(u);
    }
    const std::vector<T> ones(size_t(cols), T(1.0f));
    const std::vector<C> zeros(size_t(cols), C(0));
    std::vector<T> out = sentinel_vec<T>(cols + kGuard);
    t.cl_affine(ones.data(), nullptr, out.data(), 1, cols, cols, zeros.data(), a.data(), zeros.data(), false,
                Writes::cached);
    bad = 0;
    for (i64 j = 0; j < cols; ++j) {
        const T want = T(C(1) * a[size_t(j)] + C(0));
        if (out[size_t(j)].bits != want.bits) {
            if (bad++ == 0)
                ck.check(false, tag, fmt("narrow: float %.9g became bits %.0f, expected %.0f", double(a[size_t(j)]),
                                         double(out[size_t(j)].bits), double(want.bits)));
        }
    }
    ck.check(bad == 0 && out[size_t(cols)].bits == T(kSentinel).bits, tag, "narrow");

    // The same floats as one channel's factor each, through the channels-first runs (which may
    // narrow two vectors at a time: kernel_bodies.inl, pairs): runs of 45 values (two pairs of
    // vectors, one vector and a tail of 5 where W is 8), x a power of two varying along the run
    // (so a mix-up of the pairs' element order shows), of y = (x - 0)*a + 0 and of
    // gx = x*a + (0 - 0)*0 + 0, into a separate output and in place.
    const i64 run = 45;
    std::vector<T> run_x(static_cast<size_t>(run)), run_zeros(static_cast<size_t>(run), T(0.0f));
    for (i64 i = 0; i < run; ++i) run_x[size_t(i)] = T(C(0.25f) * C(1 << (i * 7 % 5)));  // 0.25 .. 4
    for (const Writes writes : kAllWrites) {
        for (const int variant : {0, 1, 2}) {  // cf_affine, cf_affine in place, cf_grad
            std::vector<T> runs = sentinel_vec<T>(cols * run + kGuard);
            for (i64 j = 0; j < cols; ++j) {
                T* y = runs.data() + j * run;
                const T* x = run_x.data();
                if (variant == 1) x = std::copy(run_x.begin(), run_x.end(), y) - run;
                if (variant == 2)
                    t.cf_grad(x, run_zeros.data(), y, 1, run, 0, C(0), a[size_t(j)], C(0), C(0), writes);
                else
                    t.cf_affine(x, y, 1, run, 0, C(0), a[size_t(j)], C(0), false, writes);
            }
            bad = 0;
            for (i64 i = 0; i < cols * run; ++i)
                if (runs[size_t(i)].bits != T(C(run_x[size_t(i % run)]) * a[size_t(i / run)] + C(0)).bits) ++bad;
            const char* kernel = variant == 0 ? " cf_affine" : variant == 1 ? " cf_affine in place" : " cf_grad";
            ck.check(bad == 0 && runs[size_t(cols * run)].bits == T(kSentinel).bits, tag + writes_tag(writes),
                     fmt("narrow by runs: %.0f values wrong in", double(bad), 0, 0) + kernel);
        }
    }

    // The plane kernels narrow a plane at a time (kernel_bodies.inl, stores_planes): y = x*a per
    // plane, x powers of two, a near float's smallest normal, so most planes mix normal and
    // denormal floats (and their last vector a tail), each narrowed as half.hpp narrows it.
    const std::vector<C> scale = {C(1.5e-38), C(-2.9e-38), C(1.2e-38), C(3.7e-37), C(-1.00000012f), C(0.3f)};
    const i64 planes = i64(scale.size());
    for (const i64 len : {1, 7, 16, 17, 33, 49}) {
        const i64 size = planes * len;
        std::vector<T> xs(static_cast<size_t>(size)), dys(static_cast<size_t>(size), T(0.0f));
        for (i64 i = 0; i < size; ++i) xs[size_t(i)] = T(C(0.25f) * C(1 << (i * 7 % 5)));  // 0.25 .. 4
        const std::vector<C> zero_c(size_t(planes), C(0));
        const auto check_planes = [&](const std::vector<T>& got, const char* kernel) {
            i64 wrong = 0;
            for (i64 i = 0; i < size; ++i)
                if (got[size_t(i)].bits != T(C(xs[size_t(i)]) * scale[size_t(i / len)]).bits) ++wrong;
            ck.check(wrong == 0 && got[size_t(size)].bits == T(kSentinel).bits, tag,
                     fmt("narrow by planes, len %.0f: %.0f values wrong in", double(len), double(wrong), 0) + kernel);
        };
        for (const Writes writes : kAllWrites) {
            std::vector<T> ys = sentinel_vec<T>(size + kGuard);
            t.rows_affine(xs.data(), nullptr, ys.data(), planes, len, 0, planes, zero_c.data(), scale.data(),
                          zero_c.data(), false, writes);
            check_planes(ys, " rows_affine");
            ys = sentinel_vec<T>(size + kGuard);
            t.pb_affine(xs.data(), ys.data(), 1, size, planes, len, zero_c.data(), scale.data(), zero_c.data(), false,
                        writes);
            check_planes(ys, " pb_affine");
            ys = sentinel_vec<T>(size + kGuard);
            t.pb_grad(dys.data(), xs.data(), ys.data(), 1, size, planes, len, zero_c.data(), zero_c.data(),
                      scale.data(), zero_c.data(), writes);
            check_planes(ys, " pb_grad");
        }
    }
}

// ---- eval factors, bit for bit ----------------------------------------------------------------
// alpha = w * (1 / sqrt(var + eps)), beta = b - 0*alpha in float64, rounded once to compute_t<T>:
// correctly rounded operations, so every backend must give these bits (NaN where NaN), for every
// tail length, with and without weight and bias, on variances that make alpha huge, zero,
// infinite or NaN; the guard after the end stays untouched.

template <class T>
void test_eval_factors(const KernelTable<T>& t, const std::string& tag, std::mt19937_64& rng, Checker& ck) {
    using C = compute_t<T>;
    std::uniform_real_distribution<double> unit(0.0, 4.0);
    const double inf = std::numeric_limits<double>::infinity(), nan = std::numeric_limits<double>::quiet_NaN();
    const double specials[] = {0.0, 1e-30, 3e38, inf, nan, -1.0, -1e-5, 0.5};
    for (const double eps : {1e-5, 1e-300}) {
        for (i64 channels = 0; channels <= 37; ++channels) {
            for (int given = 0; given < 4; ++given) {  // weight and bias null or not
                const size_t n = static_cast<size_t>(channels);
                std::vector<C> var(n), w(n), b(n);
                for (i64 c = 0; c < channels; ++c) {
                    var[size_t(c)] = C(c % 5 == 3 ? specials[size_t(c / 5) % 8] : unit(rng));
                    w[size_t(c)] = C(c % 7 == 4 ? specials[size_t(c / 7) % 8] : unit(rng) - 2.0);
                    b[size_t(c)] = C(unit(rng) - 2.0);
                }
                const C* wp = given & 1 ? w.data() : nullptr;
                const C* bp = given & 2 ? b.data() : nullptr;
                std::vector<C> alpha = sentinel_vec<C>(channels + kGuard), beta = sentinel_vec<C>(channels + kGuard);
                t.eval_factors(var.data(), wp, bp, channels, eps, alpha.data(), beta.data());
                i64 bad = 0;
                for (i64 c = 0; c < channels + kGuard; ++c) {
                    const size_t u = size_t(c);
                    double want_a = kSentinel, want_b = kSentinel;
                    if (c < channels) {
                        const double a = (wp ? double(w[u]) : 1.0) * (1.0 / std::sqrt(double(var[u]) + eps));
                        want_a = double(C(a));
                        want_b = double(C((bp ? double(b[u]) : 0.0) - 0.0 * a));
                    }
                    const auto same = [](double got, double want) {
                        return std::isnan(want) ? std::isnan(got) : got == want && std::signbit(got) == std::signbit(want);
                    };
                    if (!same(double(alpha[u]), want_a) || !same(double(beta[u]), want_b)) {
                        if (bad++ == 0)
                            ck.check(false, tag, fmt("eval_factors, channel %.0f: alpha %.17g, beta %.17g", double(c),
                                                     double(alpha[u]), double(beta[u])) +
                                                     " (" + std::to_string(channels) + " channels)");
                    }
                }
                ck.check(bad == 0, tag, "eval_factors");
            }
        }
    }
}

// invstd = 1 / sqrt(v + eps) in float64 lanes, in place: the training finish's invstd_of for
// many channels, with its bits (NaN where NaN) at every tail length and on the same specials.
template <class T>
void test_invstd(const KernelTable<T>& t, const std::string& tag, std::mt19937_64& rng, Checker& ck) {
    std::uniform_real_distribution<double> unit(0.0, 4.0);
    const double inf = std::numeric_limits<double>::infinity(), nan = std::numeric_limits<double>::quiet_NaN();
    const double specials[] = {0.0, 1e-300, 3e38, inf, nan, -1.0, -1e-5, 0.5};
    for (const double eps : {1e-5, 1e-300, 0.0}) {
        for (i64 n = 0; n <= 37; ++n) {
            std::vector<double> v(size_t(n) + kGuard, kSentinel);
            for (i64 i = 0; i < n; ++i) v[size_t(i)] = i % 5 == 3 ? specials[size_t(i / 5) % 8] : unit(rng);
            const std::vector<double> given = v;
            t.invstd(v.data(), n, eps);
            i64 bad = 0;
            for (i64 i = 0; i < n + i64(kGuard); ++i) {
                const size_t u = size_t(i);
                const double want = i < n ? 1.0 / std::sqrt(given[u] + eps) : kSentinel;
                const bool same = std::isnan(want) ? std::isnan(v[u]) : v[u] == want;
                if (!same && bad++ == 0)
                    ck.check(false, tag, fmt("invstd, value %.0f: %.17g for %.17g", double(i), v[u], given[u]) +
                                             " (" + std::to_string(n) + " values)");
            }
            ck.check(bad == 0, tag, "invstd");
        }
    }
}

template <class T>
void test_backend(Isa isa, Checker& ck) {
    const KernelTable<T>& t = batchnorm::detail::kernels_for<T>(isa);
    const std::string tag = std::string(batchnorm::isa_name(isa)) + "/" + type_name<T>();
    std::mt19937_64 rng(20240611u + unsigned(isa) * 7919u + sizeof(T));
    const i64 before = ck.failed;
    test_cf<T>(t, tag, rng, ck);
    test_rows<T>(t, tag, rng, ck);
    test_pb<T>(t, tag, rng, ck);
    test_cl<T>(t, tag, rng, ck);
    test_relu_nan<T>(t, tag, ck);
    test_row_params<T>(t, tag, rng, ck);
    test_eval_factors<T>(t, tag, rng, ck);
    test_invstd<T>(t, tag, rng, ck);
    if constexpr (!std::is_same_v<T, compute_t<T>>) test_conversions<T>(t, tag, rng, ck);
    std::printf("%-14s %s\n", tag.c_str(), ck.failed == before ? "ok" : "FAILED");
}

}  // namespace

int main() {
    Checker ck;
    std::string names;
    for (Isa isa : batchnorm::supported_isas()) names += std::string(" ") + batchnorm::isa_name(isa);
    std::printf("backends:%s\n", names.c_str());
    for (Isa isa : batchnorm::supported_isas()) {
        test_backend<float>(isa, ck);
        test_backend<double>(isa, ck);
        test_backend<float16>(isa, ck);
        test_backend<bfloat16>(isa, ck);
    }
    std::printf("%lld passed, %lld failed\n", static_cast<long long>(ck.passed), static_cast<long long>(ck.failed));
    return ck.failed == 0 ? 0 : 1;
}
