// Channels-last driver: rows of `cols` contiguous values, one column per channel (NHWC with
// axis=-1, (N, C), torch's channels_last memory). Small channels-first planes use it too: with
// inner < a few vectors, (outer, C, inner) is read as rows of C*inner columns, column j
// belonging to channel j / inner, so the kernels still stream whole rows.
// Threads split the rows; each keeps float64 partials per column, merged per channel after a
// barrier, then normalizes its own rows.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../kernels/table.hpp"
#include "../shape.hpp"
#include "../threads.hpp"
#include "affine.hpp"

namespace batchnorm::detail {

// Read planes shorter than this many bytes as rows (channels-last kernels).
constexpr std::int64_t kMinPlaneBytes = 128;

template <class T>
bool reads_as_rows(const Shape& s) {
    return s.inner * std::int64_t(sizeof(T)) < kMinPlaneBytes;
}

// Rows per statistics tile: the tile stays in L2 for a second pass, should it need one; large
// enough that the per-column merge after each tile costs little.
template <class T>
std::int64_t tile_rows(std::int64_t cols) {
    constexpr std::int64_t kTileBytes = std::int64_t(1) << 20;
    return std::max<std::int64_t>(1, kTileBytes / (std::max<std::int64_t>(cols, 1) * std::int64_t(sizeof(T))));
}

// Per-column scratch of one thread.
template <class T>
struct ColumnScratch {
    explicit ColumnScratch(std::int64_t cols)
        : moments(std::size_t(cols)), sum(std::size_t(cols)), s1(std::size_t(cols)), s2(std::size_t(cols)),
          shift(std::size_t(cols)) {}
    std::vector<Moments> moments;     // the thread's moments so far
    std::vector<double> sum, s1, s2;  // one tile's sums (backward: the thread's two dot sums)
    std::vector<compute_t<T>> shift;  // one tile's shifts, near its means
};

// Rows, spread over the first tile, whose mean gives its shift per column.
constexpr std::int64_t kProbeRows = 8;

// Moments of every column over `rows` rows into scratch.moments, one pass per tile in
// the usual case (as range_moments in channels_first.hpp): deviations from the mean of a few rows
// spread over the first tile, then from the mean so far; a tile where some column's shift is more than a standard
// deviation off is summed again around its own means while it is in cache.
template <class T>
void rows_moments(const KernelTable<T>& k, const T* x, std::int64_t rows, std::int64_t cols,
                  ColumnScratch<T>& w) {
    const std::int64_t step = tile_rows<T>(cols);
    const auto sum_deviations = [&](const T* tile, std::int64_t n) {
        std::fill(w.s1.begin(), w.s1.end(), 0.0);
        std::fill(w.s2.begin(), w.s2.end(), 0.0);
        k.cl_dev(tile, n, cols, w.shift.data(), w.s1.data(), w.s2.data());
    };
    for (std::int64_t r = 0; r < rows; r += step) {
        const std::int64_t n = std::min(step, rows - r);
        const T* tile = x + r * cols;
        if (r == 0) {
            const std::int64_t probe = std::min(n, kProbeRows);
            std::fill(w.sum.begin(), w.sum.end(), 0.0);
            for (std::int64_t i = 0; i < probe; ++i) k.cl_sum(tile + i * (n / probe) * cols, 1, cols, w.sum.data());
            for (std::size_t j = 0; j < std::size_t(cols); ++j) w.shift[j] = compute_t<T>(w.sum[j] / double(probe));
        } else {
            for (std::size_t j = 0; j < std::size_t(cols); ++j) w.shift[j] = compute_t<T>(w.moments[j].mean());
        }
        sum_deviations(tile, n);
        bool close = true;
        for (std::size_t j = 0; j < std::size_t(cols); ++j) close = close && shift_is_close(double(n), w.s1[j], w.s2[j]);
        if (!close) {
            for (std::size_t j = 0; j < std::size_t(cols); ++j) w.shift[j] = compute_t<T>(double(w.shift[j]) + w.s1[j] / double(n));
            sum_deviations(tile, n);
        }
        for (std::size_t j = 0; j < std::size_t(cols); ++j)
            w.moments[j] = merge(w.moments[j], from_shifted_sums(double(n), double(w.shift[j]), w.s1[j], w.s2[j]));
    }
}

// The shared shape of every rows operation. Thread t reduces rows [begin_t, end_t) into its
// scratch; after a barrier, each channel is finished once from all threads' columns; after a
// second barrier each thread applies over its own rows, which are likely still in its cache.
template <class T, class Reduce, class Finish, class Apply>
void for_each_row_block(const Shape& s, std::int64_t bytes, Reduce&& reduce, Finish&& finish,
                        Apply&& apply) {
    const std::int64_t rows = s.outer, cols = s.channels * s.inner;
    const int threads = threads_for(bytes, rows);
    std::vector<ColumnScratch<T>> scratch(std::size_t(threads), ColumnScratch<T>{cols});
    std::vector<std::int64_t> row_begin(std::size_t(threads) + 1);
    for (int t = 0; t <= threads; ++t) row_begin[std::size_t(t)] = rows * t / threads;
    // Equal static schedules over the same count give block t to the same thread in both loops.
    run_parallel(threads, [&] {
        BATCHNORM_OMP(for schedule(static))
        for (int t = 0; t < threads; ++t)
            reduce(row_begin[std::size_t(t)], row_begin[std::size_t(t) + 1], scratch[std::size_t(t)]);
        BATCHNORM_OMP(for schedule(static))
        for (std::int64_t c = 0; c < s.channels; ++c) finish(c, scratch);
        BATCHNORM_OMP(for schedule(static))
        for (int t = 0; t < threads; ++t) apply(row_begin[std::size_t(t)], row_begin[std::size_t(t) + 1]);
    });
}

// Channel c's moments, merged over every thread's block and over the channel's inner columns.
template <class T>
Moments channel_moments(const Shape& s, std::int64_t c, const std::vector<ColumnScratch<T>>& scratch) {
    Moments total;
    for (const ColumnScratch<T>& w : scratch)
        for (std::int64_t j = c * s.inner; j < (c + 1) * s.inner; ++j) total = merge(total, w.moments[std::size_t(j)]);
    return total;
}

// Moments of every channel, handed to finish(c, Moments).
template <class T, class Finish>
void moments_channels_last(const KernelTable<T>& k, const T* x, const Shape& s, Finish&& finish) {
    const std::int64_t cols = s.channels * s.inner;
    for_each_row_block<T>(
        s, s.size() * std::int64_t(sizeof(T)),
        [&](std::int64_t b, std::int64_t e, ColumnScratch<T>& w) { rows_moments(k, x + b * cols, e - b, cols, w); },
        [&](std::int64_t c, const auto& scratch) { finish(c, channel_moments(s, c, scratch)); },
        [](std::int64_t, std::int64_t) {});
}

// A per-channel scalar repeated for each of the channel's columns, for the kernels that
// vectorize across columns.
template <class T>
class PerColumn {
public:
    explicit PerColumn(const Shape& s) : inner_(s.inner), values_(std::size_t(s.channels * s.inner)) {}
    void set(std::int64_t c, T value) { std::fill_n(values_.begin() + c * inner_, inner_, value); }
    const T* data() const { return values_.data(); }

private:
    std::int64_t inner_;
    std::vector<T> values_;
};

// Statistics, finish(c, Moments) -> ChannelAffine<compute_t<T>>, and normalize, each thread its rows.
template <class T, class Finish>
void normalize_channels_last(const KernelTable<T>& k, const T* x, T* y, const Shape& s, Finish&& finish) {
    const std::int64_t cols = s.channels * s.inner;
    PerColumn<compute_t<T>> shift(s), alpha(s), beta(s);
    for_each_row_block<T>(
        s, 3 * s.size() * std::int64_t(sizeof(T)),
        [&](std::int64_t b, std::int64_t e, ColumnScratch<T>& w) { rows_moments(k, x + b * cols, e - b, cols, w); },
        [&](std::int64_t c, const auto& scratch) {
            const ChannelAffine<compute_t<T>> a = finish(c, channel_moments(s, c, scratch));
            shift.set(c, a.shift);
            alpha.set(c, a.alpha);
            beta.set(c, a.beta);
        },
        [&](std::int64_t b, std::int64_t e) {
            k.cl_affine(x + b * cols, nullptr, y + b * cols, e - b, cols, shift.data(), alpha.data(),
                        beta.data(), false);
        });
}

// Backward reduce {sum(dy), sum(dy*(x - shift[c]))}, finish(c, Sums) -> GradCoefficients<compute_t<T>>,
// and the gradient apply (skipped when gx is null).
template <class T, class Finish>
void backward_channels_last(const KernelTable<T>& k, const T* dy, const T* x, T* gx, const Shape& s,
                            const compute_t<T>* shift_of, Finish&& finish) {
    const std::int64_t cols = s.channels * s.inner;
    PerColumn<compute_t<T>> shift(s), k_coef(s), m_coef(s), q_coef(s);
    for (std::int64_t c = 0; c < s.channels; ++c) shift.set(c, shift_of[c]);
    for_each_row_block<T>(
        s, 4 * s.size() * std::int64_t(sizeof(T)),
        [&](std::int64_t b, std::int64_t e, ColumnScratch<T>& w) {
            std::fill(w.s1.begin(), w.s1.end(), 0.0);
            std::fill(w.s2.begin(), w.s2.end(), 0.0);
            k.cl_dot(dy + b * cols, x + b * cols, e - b, cols, shift.data(), w.s1.data(), w.s2.data());
        },
        [&](std::int64_t c, const auto& scratch) {
            Sums sums;
            for (const auto& w : scratch)
                for (std::size_t j = std::size_t(c * s.inner); j < std::size_t((c + 1) * s.inner); ++j)
                    sums += Sums{w.s1[j], w.s2[j]};
            const GradCoefficients<compute_t<T>> g = finish(c, sums);
            k_coef.set(c, g.k);
            m_coef.set(c, g.m);
            q_coef.set(c, g.q);
        },
        [&](std::int64_t b, std::int64_t e) {
            if (gx)
                k.cl_grad(dy + b * cols, x + b * cols, gx + b * cols, e - b, cols, shift.data(),
                          k_coef.data(), m_coef.data(), q_coef.data());
        });
}

template <class T>
void eval_channels_last(const KernelTable<T>& k, const T* x, const T* residual, T* y,
                        const Shape& s, const compute_t<T>* shift, const compute_t<T>* alpha,
                        const compute_t<T>* beta, bool relu) {
    const std::int64_t rows = s.outer, cols = s.channels * s.inner;
    const int inputs = residual ? 3 : 2;
    const int threads = threads_for(inputs * s.size() * std::int64_t(sizeof(T)), rows);
    run_parallel(threads, [&] {
        const auto [b, e] = my_share(rows);
        if (b < e)
            k.cl_affine(x + b * cols, residual ? residual + b * cols : nullptr, y + b * cols, e - b, cols, shift,
                        alpha, beta, relu);
    });
}

}  // namespace batchnorm::detail
