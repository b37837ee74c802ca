// Row segments with per-element parameters (layer norm, RMS norm): each of `rows` rows of
// `cols` contiguous values has its own statistics; weight and bias run along the row. The
// channels-first scheduler takes the rows as segments (Shape{1, rows, cols}), so a row is
// normalized right after its statistics while it is in cache, and a very long row is split
// over threads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../dispatch.hpp"
#include "affine.hpp"
#include "channels_first.hpp"

namespace batchnorm::detail {

// y = ((x - shift)*scale + offset)*w + b
template <class T>
struct RowScale {
    T shift, scale, offset;
};

// reduce(src, seg, row, begin, end) -> R over the row's values (of x, or of x + residual, which
// is first written to sum_out, or to y when sum_out is null); finish(row, R) -> RowScale<T>;
// then the normalize.
template <class R, class T, class Reduce, class Finish>
void normalize_rows(const T* x, T* y, std::int64_t rows, std::int64_t cols, const T* weight, const T* bias,
                    const T* residual, T* sum_out, Reduce&& reduce, Finish&& finish) {
    const auto& k = kernels<T>();
    const Shape seg{1, rows, cols};
    T* sum = sum_out ? sum_out : y;
    const T* src = residual ? sum : x;
    std::vector<RowScale<T>> scale(static_cast<std::size_t>(rows));
    const int passes = residual ? (sum_out ? 5 : 4) : 2;
    for_each_channel<R>(
        seg, passes * seg.size() * std::int64_t(sizeof(T)),
        [&](std::int64_t r, std::int64_t b, std::int64_t e) {
            const std::int64_t at = r * cols + b;
            if (residual) k.add(x + at, residual + at, sum + at, e - b);
            return reduce(k, src, seg, r, b, e);
        },
        [&](std::int64_t r, const R& stats) { scale[std::size_t(r)] = finish(r, stats); },
        [&](std::int64_t r, std::int64_t b, std::int64_t e) {
            const RowScale<T> s = scale[std::size_t(r)];
            const std::int64_t at = r * cols + b;
            k.row_scale(src + at, y + at, e - b, s.shift, s.scale, s.offset, weight ? weight + b : nullptr,
                        bias ? bias + b : nullptr);
        });
}

// Backward per row: {sum(dy*w), sum(dy*w*(x - shift[row]))}, finish(row, Sums) ->
// GradCoefficients<T>, then grad_x = dy*w*k + (x - shift)*m + q (when gx is not null).
template <class T, class Finish>
void backward_rows(const T* dy, const T* x, T* gx, std::int64_t rows, std::int64_t cols, const T* weight,
                   const T* shift, Finish&& finish) {
    const auto& k = kernels<T>();
    const Shape seg{1, rows, cols};
    std::vector<GradCoefficients<T>> coef(static_cast<std::size_t>(rows));
    for_each_channel<Sums>(
        seg, 3 * seg.size() * std::int64_t(sizeof(T)),
        [&](std::int64_t r, std::int64_t b, std::int64_t e) {
            const std::int64_t at = r * cols + b;
            return checked_wdot(k, dy + at, x + at, weight ? weight + b : nullptr, e - b, shift[r]);
        },
        [&](std::int64_t r, const Sums& s) { coef[std::size_t(r)] = finish(r, s); },
        [&](std::int64_t r, std::int64_t b, std::int64_t e) {
            if (!gx) return;
            const GradCoefficients<T> g = coef[std::size_t(r)];
            const std::int64_t at = r * cols + b;
            k.row_wgrad(dy + at, x + at, weight ? weight + b : nullptr, gx + at, e - b, g.shift, g.k, g.m, g.q);
        });
}

// Column sums over rows: sdy[j] = sum(dy[r][j]), sdyx[j] = sum(dy[r][j]*(x[r][j] - shift[r])*scale[r]).
// Threads take stripes of columns.
template <class T>
void row_column_sums(const T* dy, const T* x, std::int64_t rows, std::int64_t cols, const T* shift, const T* scale,
                     double* sdy, double* sdyx) {
    const auto& k = kernels<T>();
    std::fill_n(sdy, cols, 0.0);
    std::fill_n(sdyx, cols, 0.0);
    constexpr std::int64_t kStripe = 64;  // columns: whole cache lines per thread
    const std::int64_t stripes = (cols + kStripe - 1) / kStripe;
    run_parallel(threads_for(2 * rows * cols * std::int64_t(sizeof(T)), stripes), [&] {
        const auto [b, e] = my_share(stripes);
        const std::int64_t j0 = b * kStripe, j1 = std::min(cols, e * kStripe);
        if (j0 < j1) k.cols_dot(dy + j0, x + j0, rows, j1 - j0, cols, shift, scale, sdy + j0, sdyx + j0);
    });
}

}  // namespace batchnorm::detail
