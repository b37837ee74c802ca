// The engine's entry points: each picks the channels-first or the rows (channels-last) driver
// for a shape and runs one reduce -> finish -> apply schedule. Norms (norms/) supply the finish
// steps; nothing here knows which norm it serves.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../dispatch.hpp"
#include "../shape.hpp"
#include "affine.hpp"
#include "call_scratch.hpp"
#include "channels_first.hpp"
#include "channels_last.hpp"

namespace batchnorm {

enum class Activation { none, relu };

namespace detail {

// finish(c, Moments) for every channel of x.
template <class T, class Finish>
void segment_moments(const T* x, const Shape& s, Finish&& finish) {
    const auto& k = kernels<T>();
    if (moments_as_rows<T>(s)) moments_channels_last(k, x, s, finish);
    else moments_channels_first(k, x, s, finish);
}

// Statistics, finish(c, Moments) -> ChannelAffine<compute_t<T>> (and finish.channels for ranges of
// channels, see normalize_channels_last), and normalize into y, then act.
template <class T, class Finish>
void normalize_fused(const T* x, T* y, const Shape& s, Activation act, Finish&& finish) {
    const auto& k = kernels<T>();
    const bool relu = act == Activation::relu;
    if (moments_as_rows<T>(s)) normalize_channels_last(k, x, y, s, relu, finish);
    else normalize_channels_first(k, x, y, s, relu, finish);
}

// {sum(dy), sum(dy*(x - shift[c]))} per channel, finish(c, Sums) -> GradCoefficients<compute_t<T>>, and
// grad_x = k*dy + (x - shift)*m + q (when gx is not null).
template <class T, class Finish>
void backward_fused(const T* dy, const T* x, T* gx, const Shape& s, const compute_t<T>* shift, Finish&& finish) {
    const auto& k = kernels<T>();
    if (reduces_as_rows<T>(s, kSumRowsPerColumn)) backward_channels_last(k, dy, x, gx, s, shift, finish);
    else backward_channels_first(k, dy, x, gx, s, shift, finish);
}

// grad_x = k*dy + (x - shift)*m + q with given per-channel coefficients, in one pass.
template <class T>
void apply_grad(const T* dy, const T* x, T* gx, const Shape& s, const GradCoefficients<compute_t<T>>* coef) {
    const auto& k = kernels<T>();
    const std::int64_t bytes = parallel_bytes<T>(3, s.size());
    if (!reads_as_rows<T>(s)) {
        const Writes writes = output_writes<T>(s, 3, s.inner);
        for_each_channel<Sums>(
            s, bytes, [](std::int64_t, std::int64_t, std::int64_t) { return Sums{}; },
            [](std::int64_t, const Sums&) {},
            [&](std::int64_t c, std::int64_t b, std::int64_t e) {
                const GradCoefficients<compute_t<T>> g = coef[c];
                for_each_run(s, c, b, e, [&](std::int64_t at, std::int64_t n, std::int64_t len, std::int64_t stride) {
                    k.cf_grad(dy + at, x + at, gx + at, n, len, stride, g.shift, g.k, g.m, g.q, writes);
                });
            });
        return;
    }
    PerColumn<compute_t<T>> shift(s), k_coef(s), m_coef(s), q_coef(s);
    const Writes writes = output_writes<T>(s, 3, s.size());
    for_each_row_block<T>(
        s, bytes, [](std::int64_t, std::int64_t, const ColumnBlock&, ColumnScratch<T>&) {},
        each_channel([&](std::int64_t c, const ColumnBlock& blk, const auto&) {
            shift.set(blk, c, coef[c].shift);
            k_coef.set(blk, c, coef[c].k);
            m_coef.set(blk, c, coef[c].m);
            q_coef.set(blk, c, coef[c].q);
        }),
        [&](std::int64_t b, std::int64_t e, const ColumnBlock& blk) {
            grad_block_rows(k, dy, x, gx, b, e, blk, writes, shift.data(), k_coef.data(), m_coef.data(),
                            q_coef.data());
        });
}

// Applies per-channel (shift, alpha, beta) in one pass: y = act((x - shift)*alpha + beta + residual).
template <class T>
void apply_affine(const T* x, const T* residual, T* y, const Shape& shape, const compute_t<T>* shift,
                  const compute_t<T>* alpha, const compute_t<T>* beta, Activation act) {
    const auto& k = kernels<T>();
    const bool relu = act == Activation::relu;
    if (!reads_as_rows<T>(shape)) {
        eval_channels_first(k, x, residual, y, shape, shift, alpha, beta, relu);
    } else if (shape.inner == 1) {
        eval_channels_last(k, x, residual, y, shape, shift, alpha, beta, relu);
    } else {
        // Small planes, read as rows of C*inner columns: each factor repeated over its channel's
        // columns.
        const std::int64_t cols = shape.channels * shape.inner;
        CallScratch<compute_t<T>, struct ColumnFactors> columns(3 * std::size_t(cols));
        compute_t<T> *s = columns.data(), *a = s + cols, *b = a + cols;
        for (std::int64_t c = 0; c < shape.channels; ++c) {
            std::fill_n(s + c * shape.inner, shape.inner, shift[c]);
            std::fill_n(a + c * shape.inner, shape.inner, alpha[c]);
            std::fill_n(b + c * shape.inner, shape.inner, beta[c]);
        }
        eval_channels_last(k, x, residual, y, Shape{shape.outer, cols, 1}, s, a, b, relu);
    }
}

}  // namespace detail
}  // namespace batchnorm
