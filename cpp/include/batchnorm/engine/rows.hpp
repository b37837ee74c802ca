// Row segments with per-element parameters (layer norm, RMS norm): each of `rows` rows of
// `cols` contiguous values has its own statistics; weight and bias run along the row. The
// channels-first scheduler takes the rows as segments (Shape{1, rows, cols}), so a row is
// normalized right after its statistics while it is in cache, and a very long row is split
// over threads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../dispatch.hpp"
#include "affine.hpp"
#include "channels_first.hpp"
#include "short_segments.hpp"

namespace batchnorm::detail {

// y = ((x - shift)*scale + offset)*w + b; T is the compute type (float for half storage).
template <class T>
struct RowScale {
    T shift, scale, offset;
};

// The statistics of rows [first, first + count) in one block kernel call, handed to
// emit(row, R): Moments (layer norm: around a probe's mean, rows it missed summed again), or
// Sums of x and x^2 (RMS norm: around zero).
template <class R, class T, class Emit>
void block_rows_reduce(const KernelTable<T>& k, const T* src, const Shape& seg, std::int64_t first,
                       std::int64_t count, BlockScratch<T>& w, BlockReads reads, Emit&& emit) {
    if constexpr (std::is_same_v<R, Moments>) {
        block_moments(k, src, seg, first, count, w, reads, emit);
    } else {
        std::fill_n(w.shift.begin(), count, compute_t<T>(0));
        w.clear_sums();
        block_dev(k, src, seg, first, 0, count, w, reads);
        for (std::int64_t j = 0; j < count; ++j) emit(first + j, Sums{w.s1[std::size_t(j)], w.s2[std::size_t(j)]});
    }
}

// How the row kernels write: output_writes, except that float16 and bfloat16 rows are always
// written through the caches. Streamed, they had been twice as slow, most of it a defect since
// fixed (a partial line streamed at each row's end: end_of_lines, kernels/table.hpp); with it
// fixed, streaming still gained no more than 2-5 % (layer norm) and cost RMS norm's forward
// 0-40 %. AMD EPYC Zen 3, 1 thread, bfloat16, bench/cpp/ab_timing.cpp rows mode, cached ->
// streamed, 9 rounds, two runs, us: (8192, 768) layer norm 5113 -> 4992, 5088 -> 4882; RMS norm
// 3858 -> 4890, 3728 -> 3714; (16384, 768) layer norm 10793 -> 10438, 10293 -> 9993; RMS norm
// 5243 -> 7326, 7767 -> 10115.
template <class T>
Writes row_writes(const Shape& seg, int arrays) {
    const Writes writes = output_writes<T>(seg, arrays, seg.inner);
    if (sizeof(T) < sizeof(float) && writes == Writes::streamed)
        return prefetch_planes<T>(seg, arrays) ? Writes::prefetched : Writes::cached;
    return writes;
}

// Blocks of whole rows of up to a page each, half an L1 of them (the apply rereads a block
// from L1; with blocks of half an L2, as planes take, rows of 768 float32 lost 7%), the same
// number for every thread. blocks == 0: longer rows, rows cut into parts, or rows of
// kMinRowByRowBytes or more in arrays too large to come from the caches (prefetch_planes),
// which stream faster row by row (Intel Xeon, 1 thread, float32, 16384x512: 4.4 ms a row at a
// time, 5.3-6.6 in blocks). Shorter rows cost more in a row's own work than blocks lose: AMD
// EPYC Zen 3, 1 thread, float32 layer norm, row by row -> blocks (bench/cpp/ab_timing.cpp
// timing layer_norm as its rows mode does, three runs of 9 rounds): (65536, 64)
// 6369/7323/6266 -> 4366/4604/3841 us, (131072, 32) 13495/13748/13699 -> 8034/5951/7181;
// (32768, 128) went either way.
constexpr std::int64_t kMinRowByRowBytes = 512;

template <class T>
PlaneBlocks row_blocks(const Shape& seg, const ChannelSchedule& sched, int arrays) {
    const std::int64_t row_bytes = seg.inner * std::int64_t(sizeof(T)), block_row_bytes = arrays * row_bytes;
    if (sched.parts != 1 || row_bytes > kMaxBlockPlaneBytes ||
        (row_bytes >= kMinRowByRowBytes && prefetch_planes<T>(seg, arrays)))
        return {};
    return even_blocks(seg.channels, std::max<std::int64_t>(1, cache_sizes().l1d / 2 / block_row_bytes), sched.threads);
}

// Whether the row loops prefetch rows ahead of the one they work on (the backward a group
// ahead, the forward a block ahead or kPrefetchAheadBytes ahead): data from beyond the caches
// (prefetch_planes) in rows of at most kMaxPrefetchedRowBytes. A short row is the hardware
// prefetcher's worst case: a few lines, then a kernel call and the row's own work before the
// next. Longer rows lost. AMD EPYC Zen 3, float32, bench/cpp/ab_timing.cpp rows mode, 11
// rounds, us, 1 thread unless said: layer norm backward (65536, 64) 5489 -> 5138 (2 threads
// 3355 -> 3299), (32768, 128) 5711 -> 5233 (2 threads 4484 -> 4024), (16000, 256)
// 4947 -> 4686; (10922, 384) 3222 -> 3491, (8192, 512) 3284 -> 3565, (4096, 768) 2372 -> 2857.
// Forward, (65536, 64) layer norm 6290 -> 5458 and 5583 -> 5178 (2 threads 2777 -> 2523,
// 3735 -> 3180), RMS norm 5376 -> 4202; (16000, 256) layer norm 4266 -> 3672 and
// 4555 -> 3676, RMS norm 3511 -> 2984; (32768, 128) layer norm either way (8265 -> 7927,
// 6217 -> 6640).
constexpr std::int64_t kMaxPrefetchedRowBytes = 1024;
constexpr std::int64_t kPrefetchAheadBytes = 4096;

template <class T>
bool prefetches_rows(const Shape& seg, int arrays) {
    return seg.inner * std::int64_t(sizeof(T)) <= kMaxPrefetchedRowBytes && prefetch_planes<T>(seg, arrays);
}

// reduce(src, seg, row, begin, end) -> R over the row's values (of x, or of x + residual, which
// is first written to sum_out, or to y when sum_out is null); finish(row, R) -> RowScale<T>;
// then the normalize. Rows of up to a page go in blocks of rows, as short planes do
// (plane_blocks.hpp): one row at a time, the fixed work of a row cost three times its data
// ((392, 64) float32: 70 ns a row, a copy of it 7); R then says what block_rows_reduce sums.
template <class R, class T, class Reduce, class Finish>
void normalize_rows(const T* x, T* y, std::int64_t rows, std::int64_t cols, const compute_t<T>* weight,
                    const compute_t<T>* bias,
                    const T* residual, T* sum_out, Reduce&& reduce, Finish&& finish) {
    using P = compute_t<T>;
    // Rows go in blocks (below), which beat the scalar loop sooner for layer norm's moments
    // than for RMS norm's sums. (64000, L) float32, 1 thread, Intel Xeon, ms, blocks against
    // the scalar loop: layer norm L = 2: 1.15 / 0.52, L = 8: 1.30 / 0.78, L = 16: 1.37 / 1.42;
    // RMS norm L = 2: 0.92 / 0.23, L = 16: 1.06 / 0.66, L = 32: 1.44 / 1.25.
    constexpr std::int64_t kShortRow = std::is_same_v<R, Moments> ? 12 : kShortSegmentValues;
    if (!residual && cols <= kShortRow) {
        for_each_short_segment(rows, parallel_bytes<T>(2, rows * cols), [&](std::int64_t r) {
            const T* xr = x + r * cols;
            T* yr = y + r * cols;
            R stats;
            if constexpr (std::is_same_v<R, Moments>) {
                stats = short_moments(xr, 1, cols, [](std::int64_t, std::int64_t i) { return i; });
            } else {  // around zero
                for (std::int64_t i = 0; i < cols; ++i) stats += Sums{double(xr[i]), double(xr[i]) * double(xr[i])};
            }
            const RowScale<P> s = finish(r, stats);
            for (std::int64_t i = 0; i < cols; ++i) {  // as the row_scale kernels
                P v = (P(xr[i]) - s.shift) * s.scale + s.offset;
                if (weight) v = v * weight[i];
                if (bias) v = v + bias[i];
                yr[i] = T(v);
            }
        });
        return;
    }
    const auto& k = kernels<T>();
    const Shape seg{1, rows, cols};
    T* sum = sum_out ? sum_out : y;
    const T* src = residual ? sum : x;
    std::vector<RowScale<compute_t<T>>> scale(static_cast<std::size_t>(rows));
    const int passes = residual ? (sum_out ? 5 : 4) : 2;
    const std::int64_t bytes = parallel_bytes<T>(passes, seg.size());
    const Writes writes = row_writes<T>(seg, residual ? (sum_out ? 4 : 3) : 2);
    const auto fence = [&] {
        if (writes == Writes::streamed) k.fence();
    };
    const auto apply = [&](std::int64_t r, std::int64_t b, std::int64_t e) {
        const RowScale<compute_t<T>> s = scale[std::size_t(r)];
        const std::int64_t at = r * cols + b;
        k.row_scale(src + at, y + at, e - b, s.shift, s.scale, s.offset, weight ? weight + b : nullptr,
                    bias ? bias + b : nullptr, writes);
    };
    const ChannelSchedule sched = schedule_channels(seg, bytes);
    const PlaneBlocks pb = row_blocks<T>(seg, sched, passes);
    const bool prefetch = !residual && prefetches_rows<T>(seg, passes);
    const std::int64_t rows_ahead = std::max<std::int64_t>(1, kPrefetchAheadBytes / (cols * std::int64_t(sizeof(T))));
    if (pb.blocks > 0) {
        // In memory order: a block's rows are one run. Each row of the normalize, read from
        // L1, prefetches its row of the next block (prefetches_rows).
        const BlockReads reads = BlockReads::streamed;
        for_each_plane_block<T>(sched, pb, rows, [&](std::int64_t first, std::int64_t count, BlockScratch<T>& w) {
            if (residual) k.add(x + first * cols, residual + first * cols, sum + first * cols, count * cols);
            block_rows_reduce<R>(k, src, seg, first, count, w, reads,
                                 [&](std::int64_t r, const R& stats) { scale[std::size_t(r)] = finish(r, stats); });
            for (std::int64_t r = first; r < first + count; ++r) {
                if (prefetch && r + count < rows) prefetch_run(x + (r + count) * cols, cols);
                apply(r, 0, cols);
            }
            fence();
        });
        return;
    }
    for_each_channel<R>(
        seg, sched,
        [&](std::int64_t r, std::int64_t b, std::int64_t e) {
            const std::int64_t at = r * cols + b;
            if (prefetch && r + rows_ahead < rows) prefetch_run(x + at + rows_ahead * cols, e - b);
            if (residual) k.add(x + at, residual + at, sum + at, e - b);
            return reduce(k, src, seg, r, b, e);
        },
        [&](std::int64_t r, const R& stats) { scale[std::size_t(r)] = finish(r, stats); }, apply, fence);
}

// The terms of the column sums below in float64: dy[r][j], and (x[r][j] - shift[r])*scale[r], by
// which dy[r][j] is multiplied.
template <class T>
struct ColumnTerms {
    const T *dy_, *x_;
    std::int64_t cols;
    const compute_t<T>*shift_, *scale_;
    double dy(std::int64_t r, std::int64_t j) const { return double(dy_[r * cols + j]); }
    double xhat(std::int64_t r, std::int64_t j) const {
        return (double(x_[r * cols + j]) - double(shift_[r])) * double(scale_[r]);
    }
};

// Column sums over rows: sdy[j] = sum(dy[r][j]), sdyx[j] = sum(dy[r][j]*(x[r][j] - shift[r])*scale[r]).
// Threads take stripes of columns.
template <class T>
void row_column_sums(const T* dy, const T* x, std::int64_t rows, std::int64_t cols, const compute_t<T>* shift,
                     const compute_t<T>* scale, double* sdy, double* sdyx) {
    const auto& k = kernels<T>();
    std::fill_n(sdy, cols, 0.0);
    std::fill_n(sdyx, cols, 0.0);
    constexpr std::int64_t kStripe = 64;  // columns: whole cache lines per thread
    const std::int64_t stripes = (cols + kStripe - 1) / kStripe;
    run_parallel(threads_for(parallel_bytes<T>(2, rows * cols), stripes), [&] {
        const auto [b, e] = my_share(stripes);
        const std::int64_t j0 = b * kStripe, j1 = std::min(cols, e * kStripe);
        if (j0 < j1) k.cols_dot(dy + j0, x + j0, rows, j1 - j0, cols, shift, scale, sdy + j0, sdyx + j0);
    });
    const ColumnTerms<T> terms{dy, x, cols, shift, scale};
    recheck_columns<T>(
        rows, cols, sdy, sdyx, [&](std::int64_t r, std::int64_t j) { return terms.dy(r, j); },
        [&](std::int64_t r, std::int64_t j) { return terms.xhat(r, j); });
}

// Adds the column lanes of rows [r0, r0 + n) (row_wdot_cols: dy in lanes[0, cols), the
// dy*(x - shift)*scale terms in lanes[cols, 2*cols)) into sums (the same layout, float64) and
// clears them; columns whose lanes overflowed are summed again in float64 (overflow.hpp). The
// common case, no lane overflowed, is two loops the compiler vectorizes. (A column at a time,
// with the test between, the whole flush was 13 % of layer norm's backward on (4096, 64); two
// loops, that backward went 214 -> 206 us. AMD EPYC Zen 3, float32, 1 thread.)
template <class T>
void flush_column_lanes(const ColumnTerms<T>& terms, std::int64_t r0, std::int64_t n, compute_t<T>* lanes,
                        double* sums) {
    using P = compute_t<T>;
    const std::int64_t cols = terms.cols;
    int overflowed = 0;
    if constexpr (std::is_same_v<P, float>) {
        for (std::int64_t j = 0; j < 2 * cols; ++j) overflowed |= lanes[j] * 0.0f != 0.0f;  // inf or NaN
    }
    if (!overflowed) {
        for (std::int64_t j = 0; j < 2 * cols; ++j) {
            sums[j] += double(lanes[j]);
            lanes[j] = P(0);
        }
        return;
    }
    for (std::int64_t j = 0; j < cols; ++j) {
        double a = double(lanes[j]), b = double(lanes[cols + j]);
        if (lanes_overflowed<T>(a, b)) {
            a = b = 0;
            for (std::int64_t r = r0; r < r0 + n; ++r) {
                const double g = terms.dy(r, j);
                a += g;
                b += g * terms.xhat(r, j);
            }
        }
        sums[j] += a;
        sums[cols + j] += b;
        lanes[j] = lanes[cols + j] = P(0);
    }
}

// Rows per group of the fused backward: at most kFlushVectors (the float32 lanes' budget), and
// few enough that the group's dy and x stay in L2 from the row sums to the row pass.
template <class T>
std::int64_t backward_group_rows(std::int64_t cols) {
    constexpr std::int64_t kGroupBytes = 256 << 10;
    return std::clamp<std::int64_t>(kGroupBytes / std::max<std::int64_t>(1, 2 * cols * std::int64_t(sizeof(T))), 1,
                                    kFlushVectors);
}

// Widest rows whose per-thread column partials (two float64 per column) the fused backward keeps.
constexpr std::int64_t kFusedColumns = 16 << 10;

// Backward per row: {sum(dy*w), sum(dy*w*(x - shift[row]))}, finish(row, Sums) ->
// GradCoefficients<compute_t<T>>, then grad_x = dy*w*k + (x - shift)*m + q (when gx is not null). When sdy
// is not null, also the column sums of row_column_sums (with shift and scale per row): taken in
// the same read as the row sums (each thread a block of rows, float64 partials per column)
// unless rows are too few to share out or too wide, then in a pass of their own first.
template <class T, class Finish>
void backward_rows(const T* dy, const T* x, T* gx, std::int64_t rows, std::int64_t cols, const compute_t<T>* weight,
                   const compute_t<T>* shift, const compute_t<T>* scale, double* sdy, double* sdyx, Finish&& finish) {
    const auto& k = kernels<T>();
    const Shape seg{1, rows, cols};
    const std::int64_t bytes = parallel_bytes<T>(kBackwardArrays, seg.size());
    const int threads = threads_for(bytes, rows);
    const Writes writes = row_writes<T>(seg, 3);
    const auto fence = [&] {
        if (gx && writes == Writes::streamed) k.fence();
    };
    const auto row_pass = [&](std::int64_t r, std::int64_t b, std::int64_t e, const GradCoefficients<compute_t<T>>& g) {
        if (!gx) return;
        const std::int64_t at = r * cols + b;
        k.row_wgrad(dy + at, x + at, weight ? weight + b : nullptr, gx + at, e - b, g.shift, g.k, g.m, g.q, writes);
    };
    const auto row_sums = [&](std::int64_t r, std::int64_t b, std::int64_t e) {
        const std::int64_t at = r * cols + b;
        return checked_wdot(k, dy + at, x + at, weight ? weight + b : nullptr, e - b, shift[r]);
    };
    if (sdy && rows >= threads && cols <= kFusedColumns) {
        // Each thread a block of rows, in groups of up to kFlushVectors rows. A row's column terms
        // go into float32 lanes (compute_t) in the same read as its row sums (row_wdot_cols);
        // the group's lanes then go into the thread's float64 partials, and the row pass
        // rereads the group from L2. The column sums had a read of their own (cols_dot), and
        // the row sums a second: layer norm backward with weight, float32, AMD EPYC Zen 3,
        // 1 thread, bench/cpp/ab_timing.cpp rows mode, 9 rounds, us: (4096, 768) 4440 -> 2810,
        // (1024, 768) 562 -> 452, (16000, 256) 4644 -> 4230, (65536, 64) 6595 -> 6036.
        // (With the row pass right after each row's sums, from L1, it was no faster, and an
        // overflowed column could no longer be summed again once gx had overwritten dy.)
        using P = compute_t<T>;
        const std::size_t width = static_cast<std::size_t>(cols);
        std::vector<double> partial(std::size_t(threads) * 2 * width, 0.0);
        // Each thread's lanes on lines of their own: they are written on every row.
        constexpr std::size_t kLine = std::size_t(kLineBytes) / sizeof(P);
        const std::size_t lanes_stride = (2 * width + kLine - 1) / kLine * kLine;
        std::vector<P> lanes(std::size_t(threads) * lanes_stride + kLine, P(0));
        P* const lanes_start = lanes.data() + values_before_line(lanes.data(), std::int64_t(kLine));
        const ColumnTerms<T> terms{dy, x, cols, shift, scale};
        const std::int64_t group = backward_group_rows<T>(cols);
        const bool prefetch = prefetches_rows<T>(seg, 3);
        run_parallel(threads, [&] {
            BATCHNORM_OMP(for schedule(static))
            for (int t = 0; t < threads; ++t) {
                double* py = partial.data() + std::size_t(t) * 2 * width;
                P* pl = lanes_start + std::size_t(t) * lanes_stride;
                Sums sums[kFlushVectors];
                const std::int64_t end = rows * (t + 1) / threads;
                for (std::int64_t r0 = rows * t / threads; r0 < end; r0 += group) {
                    const std::int64_t n = std::min(group, end - r0);
                    for (std::int64_t i = 0; i < n; ++i) {
                        const std::int64_t at = (r0 + i) * cols;
                        if (prefetch && r0 + i + group < end) {
                            prefetch_run(dy + at + group * cols, cols);
                            prefetch_run(x + at + group * cols, cols);
                        }
                        sums[i] = k.row_wdot_cols(dy + at, x + at, weight, cols, shift[r0 + i], scale[r0 + i], pl);
                    }
                    // before the row pass: gx may be dy itself (in place)
                    flush_column_lanes(terms, r0, n, pl, py);
                    for (std::int64_t i = 0; i < n; ++i) {
                        const std::int64_t r = r0 + i;
                        const Sums s = lanes_overflowed<T>(sums[i].first, sums[i].second) ? row_sums(r, 0, cols) : sums[i];
                        row_pass(r, 0, cols, finish(r, s));
                    }
                }
                fence();
            }
        });
        std::fill_n(sdy, cols, 0.0);
        std::fill_n(sdyx, cols, 0.0);
        for (int t = 0; t < threads; ++t)
            for (std::size_t j = 0; j < width; ++j) {
                sdy[j] += partial[std::size_t(t) * 2 * width + j];
                sdyx[j] += partial[std::size_t(t) * 2 * width + width + j];
            }
        return;
    }
    if (sdy) row_column_sums(dy, x, rows, cols, shift, scale, sdy, sdyx);  // first: gx may be dy
    std::vector<GradCoefficients<compute_t<T>>> coef(static_cast<std::size_t>(rows));
    for_each_channel<Sums>(
        seg, bytes, row_sums, [&](std::int64_t r, const Sums& s) { coef[std::size_t(r)] = finish(r, s); },
        [&](std::int64_t r, std::int64_t b, std::int64_t e) { row_pass(r, b, e, coef[std::size_t(r)]); }, fence);
}

}  // namespace batchnorm::detail
