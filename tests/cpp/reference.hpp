// Float64 reference for the C++ tests: plain loops over the (outer, channels, inner) view, no
// code shared with the library. Also test data and comparison helpers.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <batchnorm/shape.hpp>

namespace ref {

using i64 = std::int64_t;
using batchnorm::Shape;

inline i64 at(const Shape& s, i64 o, i64 c, i64 i) { return (o * s.channels + c) * s.inner + i; }

inline std::string str(const Shape& s) {
    std::ostringstream os;
    os << "(" << s.outer << ", " << s.channels << ", " << s.inner << ")";
    return os.str();
}

// Per-channel mean, biased and unbiased variance, two passes in float64.
struct Stats {
    std::vector<double> mean, var, unbiased;
};

template <class T>
Stats stats(const std::vector<T>& x, const Shape& s) {
    Stats r;
    const double n = double(s.per_channel());
    for (i64 c = 0; c < s.channels; ++c) {
        double sum = 0;
        for (i64 o = 0; o < s.outer; ++o)
            for (i64 i = 0; i < s.inner; ++i) sum += double(x[std::size_t(at(s, o, c, i))]);
        const double mean = sum / n;
        double m2 = 0;
        for (i64 o = 0; o < s.outer; ++o)
            for (i64 i = 0; i < s.inner; ++i) {
                const double d = double(x[std::size_t(at(s, o, c, i))]) - mean;
                m2 += d * d;
            }
        r.mean.push_back(mean);
        r.var.push_back(m2 / n);
        r.unbiased.push_back(m2 / (n - 1));
    }
    return r;
}

// y = act((x - mean)/sqrt(var + eps)*weight + bias + residual); weight/bias empty means 1/0.
template <class T>
std::vector<double> normalize(const std::vector<T>& x, const Shape& s, const std::vector<double>& mean,
                              const std::vector<double>& var, const std::vector<double>& weight,
                              const std::vector<double>& bias, double eps,
                              const std::vector<T>* residual = nullptr, bool relu = false) {
    std::vector<double> y(x.size());
    for (i64 o = 0; o < s.outer; ++o)
        for (i64 c = 0; c < s.channels; ++c) {
            const std::size_t cc = std::size_t(c);
            const double w = weight.empty() ? 1.0 : weight[cc], b = bias.empty() ? 0.0 : bias[cc];
            const double invstd = 1.0 / std::sqrt(var[cc] + eps);
            for (i64 i = 0; i < s.inner; ++i) {
                const std::size_t k = std::size_t(at(s, o, c, i));
                double v = (double(x[k]) - mean[cc]) * invstd * w + b;
                if (residual) v += double((*residual)[k]);
                if (relu) v = std::max(v, 0.0);
                y[k] = v;
            }
        }
    return y;
}

// Backward through batch norm, DESIGN.md's formulas. training: gradient through the batch
// statistics; else grad_x = dy*weight*invstd.
struct Grads {
    std::vector<double> gx, gw, gb;
    double gx_scale = 0;              // max over elements of the terms' magnitudes
    std::vector<double> gw_scale;     // sum |dy*(x - mean)|*invstd per channel
    std::vector<double> gb_scale;     // sum |dy| per channel
};

template <class T>
Grads backward(const std::vector<T>& dy, const std::vector<T>& x, const Shape& s,
               const std::vector<double>& mean, const std::vector<double>& invstd,
               const std::vector<double>& weight, bool training) {
    Grads g;
    g.gx.resize(x.size());
    const double n = double(s.per_channel());
    for (i64 c = 0; c < s.channels; ++c) {
        const std::size_t cc = std::size_t(c);
        double sum_dy = 0, sum_dy_xmu = 0, abs_dy = 0, abs_dy_xmu = 0;
        for (i64 o = 0; o < s.outer; ++o)
            for (i64 i = 0; i < s.inner; ++i) {
                const std::size_t k = std::size_t(at(s, o, c, i));
                const double d = double(dy[k]), xm = double(x[k]) - mean[cc];
                sum_dy += d;
                sum_dy_xmu += d * xm;
                abs_dy += std::abs(d);
                abs_dy_xmu += std::abs(d * xm);
            }
        const double w = weight.empty() ? 1.0 : weight[cc], is = invstd[cc];
        g.gw.push_back(sum_dy_xmu * is);
        g.gb.push_back(sum_dy);
        g.gw_scale.push_back(abs_dy_xmu * is);
        g.gb_scale.push_back(abs_dy);
        for (i64 o = 0; o < s.outer; ++o)
            for (i64 i = 0; i < s.inner; ++i) {
                const std::size_t k = std::size_t(at(s, o, c, i));
                const double d = double(dy[k]), xm = double(x[k]) - mean[cc];
                double v, mag;
                if (training) {
                    const double t1 = d, t2 = sum_dy / n, t3 = xm * is * is * sum_dy_xmu / n;
                    v = w * is * (t1 - t2 - t3);
                    mag = std::abs(w * is) * (std::abs(t1) + std::abs(t2) + std::abs(t3));
                } else {
                    v = d * w * is;
                    mag = std::abs(v);
                }
                g.gx[k] = v;
                g.gx_scale = std::max(g.gx_scale, mag);
            }
    }
    return g;
}

// ---- data ---------------------------------------------------------------------------------

// Normal values with a per-channel offset: channel c has mean offset + c and std spread.
template <class T>
std::vector<T> random_input(const Shape& s, std::uint64_t seed, double offset = 3.0, double spread = 2.0) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<double> normal(0.0, spread);
    std::vector<T> x(std::size_t(s.size()));
    for (i64 o = 0; o < s.outer; ++o)
        for (i64 c = 0; c < s.channels; ++c)
            for (i64 i = 0; i < s.inner; ++i) x[std::size_t(at(s, o, c, i))] = T(offset + double(c) + normal(rng));
    return x;
}

template <class T>
std::vector<T> random_vector(std::size_t n, std::uint64_t seed, double lo, double hi) {
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<double> u(lo, hi);
    std::vector<T> v(n);
    for (auto& e : v) e = T(u(rng));
    return v;
}

template <class T>
std::vector<double> widen(const std::vector<T>& v) {
    return std::vector<double>(v.begin(), v.end());
}

// ---- comparison ---------------------------------------------------------------------------

// Relative tolerance of the outputs: the design target for float32 (1e-5), float64 to match.
template <class T>
constexpr double tol() {
    return sizeof(T) == 4 ? 1e-5 : 1e-12;
}

// |actual[k] - expected[k]| <= rtol*(scale + |expected[k]|) for every k; reports the worst.
template <class T>
::testing::AssertionResult close(const std::vector<T>& actual, const std::vector<double>& expected,
                                 double rtol, double scale = 1.0) {
    if (actual.size() != expected.size())
        return ::testing::AssertionFailure() << "size " << actual.size() << " != " << expected.size();
    double worst = 0;
    std::size_t where = 0;
    bool bad = false;
    for (std::size_t k = 0; k < actual.size(); ++k) {
        const double err = std::abs(double(actual[k]) - expected[k]);
        const double allowed = rtol * (scale + std::abs(expected[k]));
        if (!(err <= allowed)) {  // NaN fails too
            bad = true;
            if (!(err / allowed <= worst)) {
                worst = err / allowed;
                where = k;
            }
        }
    }
    if (!bad) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "element " << where << ": " << double(actual[where]) << " vs "
                                         << expected[where] << " (error " << worst << "x the tolerance)";
}

// Bitwise equality (NaN-safe).
template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
    return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

// Shapes that reach every driver: rows with inner 1, rows with a small inner, channels-first
// in blocks of short planes and channel by channel, a size that reads as rows in float and as
// plane blocks in double, odd channel counts.
inline std::vector<Shape> shapes() {
    return {
        {7, 5, 1},    // (N, C)
        {6, 4, 3},    // (N, C, L) small L: rows with inner 3
        {3, 2, 20},   // rows in float (80 B planes), plane blocks in double (160 B)
        {4, 3, 37},   // channels-first, plane blocks
        {2, 17, 64},  // plane blocks, odd channel count
        {3, 5, 300},  // channels-first, channel by channel (planes longer than the blocks take)
        {33, 19, 1},  // rows, odd channel count
    };
}

// Large enough to use several threads: in float, each call moves more than the 2 MiB below
// which batchnorm stays on one thread (threads.hpp, kMinParallelBytes).
inline std::vector<Shape> large_shapes() {
    return {
        {8, 6, 8192},   // channels-first, C < threads on most machines: channels are split
        {256, 64, 49},  // plane blocks (7x7), shared out over the threads
        {80000, 7, 1},  // rows (NHWC-like)
        {20000, 5, 6},  // rows with inner 6
    };
}

}  // namespace ref
