// Channels-last driver: rows of `cols` contiguous values, one column per channel (NHWC with
// axis=-1, (N, C), torch's channels_last memory). Small channels-first planes use it too: with
// inner < a few vectors, (outer, C, inner) is read as rows of C*inner columns, column j
// belonging to channel j / inner, so the kernels still stream whole rows.
// Threads split the rows; each keeps float64 partials per column, merged per channel after a
// barrier, then normalizes its own rows. Very wide rows go in blocks of columns, so that the
// per-thread scratch (about 50 bytes per column) stays bounded whatever the width.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>
#include <vector>

#include "../kernels/table.hpp"
#include "../shape.hpp"
#include "../threads.hpp"
#include "affine.hpp"
#include "cache.hpp"
#include "overflow.hpp"

namespace batchnorm::detail {

// Read planes shorter than this many bytes as rows (channels-last kernels), counting the bytes
// of the compute type: the vector lanes a plane fills decide, so a float16 or bfloat16 plane
// is read as a float32 plane of the same length is (its values are float lanes in registers).
constexpr std::int64_t kMinPlaneBytes = 128;

template <class T>
constexpr std::int64_t min_plane_values() {
    return kMinPlaneBytes / std::int64_t(sizeof(compute_t<T>));
}

template <class T>
bool reads_as_rows(const Shape& s) {
    return s.inner < min_plane_values<T>();
}

// A reduction reads short planes as rows only when there are enough rows: the rows driver
// keeps float64 partials for each of the C*inner columns and merges a channel's columns at
// the end, a cost per column that the channels-first driver does not pay (it pays per plane:
// a horizontal sum, a tail). Measured on an AMD EPYC (Zen 5), 1 thread, over N x C x 4x4,
// 5x5 and 7x7 (float32, float16): the rows driver wins in training (Chan merges per column)
// from about 3*inner rows, in backward (plain sums per column) from about inner rows; below
// that it cost up to 6x (float16 1x64x7x7 training: 47 us, 8 us channels-first).
constexpr std::int64_t kMomentRowsPerColumn = 3;
constexpr std::int64_t kSumRowsPerColumn = 1;

template <class T>
bool reduces_as_rows(const Shape& s, std::int64_t rows_per_column) {
    return reads_as_rows<T>(s) && (s.inner == 1 || s.outer >= rows_per_column * s.inner);
}

// Moments of planes of at least half the rows threshold (16 float lanes: a whole AVX-512
// vector) go channels-first whatever the rows: the blocks of short planes (plane_blocks.hpp)
// beat the per-column merges there. Measured on an AMD EPYC (Zen 5), float32 training, 1
// thread: 64x128x4x4 65 -> 36 us, 512x32x4x4 78 -> 61 us; shorter planes (3x3, 2x2) stay
// rows (256x64x3x3: 49 us as rows, 58 us in blocks; 1024x16x2x2: 8 us, 56 us).
template <class T>
bool moments_as_rows(const Shape& s) {
    return s.inner < min_plane_values<T>() / 2 && reduces_as_rows<T>(s, kMomentRowsPerColumn);
}

// Rows per statistics tile: the per-core L2's size (cache.hpp), so the tile stays there for a
// second pass, should it need one; but at least kMinTileRows, so that the per-column work after
// each tile (shifts, merges: tens of cycles a column) is spread over enough rows. That second
// pass is rare (a shift more than a standard deviation off); wide rows on a small L2 are not:
// (64, 4096) float32 on a 512 KiB L2 made two 32-row tiles (AMD EPYC, Zen 1, 1 thread,
// bench/cpp/ab_timing.cpp: batch_stats 148 -> 112 us, training 341 -> 304 us with one tile).
constexpr std::int64_t kMinTileRows = 128;

template <class T>
std::int64_t tile_rows(std::int64_t cols) {
    const std::int64_t tile_bytes = cache_sizes().l2;
    return std::max<std::int64_t>(kMinTileRows,
                                  tile_bytes / (std::max<std::int64_t>(cols, 1) * std::int64_t(sizeof(T))));
}

// Columns per block: wider rows are processed a block of whole channels at a time, which
// bounds each thread's scratch at about 1 MiB.
constexpr std::int64_t kBlockColumns = 16 << 10;

// Channels [first, first + count) of a row-major shape: columns [col, col + cols) of rows
// `ld` values apart.
struct ColumnBlock {
    std::int64_t first, count, col, cols, ld;
};

// Per-column scratch of one thread. Movable, not copyable: `moments` points into moment_values.
template <class T>
struct ColumnScratch {
    ColumnScratch() = default;
    ColumnScratch(ColumnScratch&&) noexcept = default;
    ColumnScratch& operator=(ColumnScratch&&) noexcept = default;
    ColumnScratch(const ColumnScratch&) = delete;
    ColumnScratch& operator=(const ColumnScratch&) = delete;

    void resize(std::int64_t cols) {
        const std::size_t n = std::size_t(cols);
        moment_values.resize(3 * n);
        moments.shift = moment_values.data();
        moments.offset = moments.shift + n;
        moments.m2 = moments.offset + n;
        sum.resize(n);
        s1.resize(n);
        s2.resize(n);
        shift.resize(n);
    }
    MomentsColumns moments;              // the thread's moments so far, in moment_values
    std::vector<double> moment_values;
    std::vector<double> sum, s1, s2;     // one tile's sums (backward: the thread's two dot sums)
    std::vector<compute_t<T>> shift;     // one tile's shifts, near its means
};

// Rows, spread over the first tile, whose mean gives its shift per column.
constexpr std::int64_t kProbeRows = 8;

// Moments of every column of block b over `rows` rows (x at the block's first row and column)
// into scratch.moments, one pass per tile in the usual case (as range_moments in
// channels_first.hpp): deviations from the mean of a few rows spread over the first tile, then
// from the mean so far; the columns of a tile whose shift was more than a standard deviation off
// are summed again around their own means while the tile is in cache.
template <class T>
void rows_moments(const KernelTable<T>& k, const T* x, std::int64_t rows, const ColumnBlock& b, ColumnScratch<T>& w,
                  BlockReads reads) {
    const std::int64_t cols = b.cols, step = tile_rows<T>(cols);
    const std::size_t ncols = std::size_t(cols);
    w.moments.count = 0;  // the first tile sets them
    for (std::int64_t r = 0; r < rows; r += step) {
        const std::int64_t n = std::min(step, rows - r);
        const T* tile = x + r * b.ld;
        if (r == 0) {
            const std::int64_t probe = std::min(n, kProbeRows);
            std::fill_n(w.sum.begin(), ncols, 0.0);
            checked_cl_sum(k, tile, probe, cols, (n / probe) * b.ld, w.sum.data());  // one flush for all of them
            const double inv_probe = 1.0 / double(probe);  // any value near the mean will do as the shift
            for (std::size_t j = 0; j < ncols; ++j) w.shift[j] = compute_t<T>(finite_shift(w.sum[j] * inv_probe));
        } else {
            for (std::size_t j = 0; j < ncols; ++j) w.shift[j] = compute_t<T>(finite_shift(w.moments.shift[j] + w.moments.offset[j]));
        }
        std::fill_n(w.s1.begin(), ncols, 0.0);
        std::fill_n(w.s2.begin(), ncols, 0.0);
        checked_cl_dev(k, tile, n, cols, b.ld, w.shift.data(), w.s1.data(), w.s2.data(), reads);
        resum_far_columns(cols, k.lanes, double(n), w.shift.data(), w.s1.data(), w.s2.data(),
                          [&](std::int64_t j0, std::int64_t j1) {
                              checked_cl_dev(k, tile + j0, n, j1 - j0, b.ld, w.shift.data() + j0, w.s1.data() + j0,
                                             w.s2.data() + j0, BlockReads::resident);  // the tile is in cache
                          });
        merge_shifted_sums(w.moments, cols, double(n), w.shift.data(), w.s1.data(), w.s2.data());
    }
}

// The apply pass walks a thread's rows in chunks, last chunk first: the reduce pass has just
// read them front to back, so the rows it read last are the ones still in the core's L2. In
// order, an apply over rows that fill the L2 (a reduce's inputs plus an output) evicts each
// row just before reading it. A chunk spans many pages of each row stream, so the hardware
// prefetchers still run within it. Measured on an Intel Xeon (Sapphire Rapids, 2 MiB L2), 1
// thread, float32 backward: 256x1024 155 -> 130 us, 4096x64 130 -> 105 us, 6272x256 (6 MB)
// 1128 -> 1071 us; training and 2 threads unchanged within noise.
template <class T>
std::int64_t apply_chunk_rows(const ColumnBlock& b) {
    const std::int64_t chunk_bytes = cache_sizes().l2 / 16;
    return std::max<std::int64_t>(1, chunk_bytes / (std::max<std::int64_t>(b.cols, 1) * std::int64_t(sizeof(T))));
}

template <class Apply>
void apply_last_first(std::int64_t begin, std::int64_t end, std::int64_t chunk_rows, Apply&& apply) {
    for (std::int64_t chunk_end = end; chunk_end > begin; chunk_end -= chunk_rows)
        apply(std::max(begin, chunk_end - chunk_rows), chunk_end);
}

// The shared shape of every rows operation, per column block: thread t reduces rows
// [begin_t, end_t) of the block into its scratch (reduce(begin, end, block, scratch)); after a
// barrier, each channel of the block is finished once from all threads' columns, each thread
// finishing a range of them (finish(c_begin, c_end, block, scratches); each_channel makes it
// per channel); after a second barrier each thread applies over its own rows (apply(begin, end,
// block), called on chunks of them, last first: apply_last_first).
template <class T, class Reduce, class Finish, class Apply>
void for_each_row_block(const Shape& s, std::int64_t bytes, Reduce&& reduce, Finish&& finish,
                        Apply&& apply) {
    const std::int64_t rows = s.outer, cols = s.channels * s.inner;
    const int threads = threads_for(bytes, rows);
    const std::int64_t per_block = std::max<std::int64_t>(1, kBlockColumns / std::max<std::int64_t>(s.inner, 1));
    const std::int64_t block_cols = std::min(cols, per_block * s.inner);
    // One scratch per thread, kept by the calling thread from call to call: allocated per call,
    // a block's scratch (moments alone pass malloc's mmap threshold) cost page faults every time
    // (measured on an AMD EPYC: backward of 32x256x4x4 float32, 197 us, most of it faults).
    // (A reference: a thread_local named in the parallel region would be each worker's own.)
    thread_local std::vector<ColumnScratch<T>> kept;
    std::vector<ColumnScratch<T>>& scratch = kept;
    scratch.resize(std::size_t(threads));  // exactly one per thread: finish steps merge them all
    for (ColumnScratch<T>& w : scratch) w.resize(block_cols);
    std::vector<std::int64_t> row_begin(std::size_t(threads) + 1);
    for (int t = 0; t <= threads; ++t) row_begin[std::size_t(t)] = rows * t / threads;
    for (std::int64_t first = 0; first < s.channels; first += per_block) {
        const std::int64_t count = std::min(per_block, s.channels - first);
        const ColumnBlock b{first, count, first * s.inner, count * s.inner, cols};
        // Equal static schedules over the same count give block t to the same thread in both loops.
        run_parallel(threads, [&] {
            BATCHNORM_OMP(for schedule(static))
            for (int t = 0; t < threads; ++t)
                reduce(row_begin[std::size_t(t)], row_begin[std::size_t(t) + 1], b, scratch[std::size_t(t)]);
            BATCHNORM_OMP(for schedule(static))
            for (int t = 0; t < threads; ++t)
                finish(first + count * t / threads, first + count * (t + 1) / threads, b, scratch);
            BATCHNORM_OMP(for schedule(static))
            for (int t = 0; t < threads; ++t)
                apply_last_first(row_begin[std::size_t(t)], row_begin[std::size_t(t) + 1], apply_chunk_rows<T>(b),
                                 [&](std::int64_t begin, std::int64_t end) { apply(begin, end, b); });
        });
    }
}

// A finish step for for_each_row_block from one per channel: finish(c, block, scratches).
template <class Finish>
auto each_channel(Finish&& finish) {
    return [finish = std::forward<Finish>(finish)](std::int64_t c_begin, std::int64_t c_end, const ColumnBlock& b,
                                                   const auto& scratch) {
        for (std::int64_t c = c_begin; c < c_end; ++c) finish(c, b, scratch);
    };
}

// Columns [j0, j1) of a block (block-relative), merged over every thread's rows.
template <class T>
Moments columns_moments(std::int64_t j0, std::int64_t j1, const std::vector<ColumnScratch<T>>& scratch) {
    Moments total;
    for (const ColumnScratch<T>& w : scratch)
        for (std::int64_t j = j0; j < j1; ++j) total = merge(total, w.moments.at(j));
    return total;
}

// Columns [j0, j0 + cols) of a block (block-relative), each merged over every thread's rows, in
// place of the first thread's (each finishing thread owns its range of columns). Only the
// returned view counts every thread's rows.
template <class T>
MomentsColumns merge_thread_columns(std::int64_t j0, std::int64_t cols, std::vector<ColumnScratch<T>>& scratch) {
    const auto from = [j0](const MomentsColumns& m) {
        return MomentsColumns{m.count, m.shift + j0, m.offset + j0, m.m2 + j0};
    };
    MomentsColumns total = from(scratch[0].moments);
    for (std::size_t t = 1; t < scratch.size(); ++t) merge_columns(total, from(scratch[t].moments), cols);
    return total;
}

// Channel c's moments, merged over every thread's block and over the channel's inner columns.
template <class T>
Moments channel_moments(const Shape& s, std::int64_t c, const ColumnBlock& b,
                        const std::vector<ColumnScratch<T>>& scratch) {
    const std::int64_t j0 = (c - b.first) * s.inner;
    return columns_moments(j0, j0 + s.inner, scratch);
}

template <class T>
void block_moments(const KernelTable<T>& k, const T* x, std::int64_t begin, std::int64_t end, const ColumnBlock& b,
                   ColumnScratch<T>& w, BlockReads reads) {
    rows_moments(k, x + begin * b.ld + b.col, end - begin, b, w, reads);
}

// Moments of every channel, handed to finish(c, Moments).
template <class T, class Finish>
void moments_channels_last(const KernelTable<T>& k, const T* x, const Shape& s, Finish&& finish) {
    const BlockReads reads = block_reads<T>(s, 1, 1);
    for_each_row_block<T>(
        s, parallel_bytes<T>(1, s.size()),
        [&](std::int64_t b, std::int64_t e, const ColumnBlock& blk, ColumnScratch<T>& w) {
            block_moments(k, x, b, e, blk, w, reads);
        },
        [&](std::int64_t c_begin, std::int64_t c_end, const ColumnBlock& blk, auto& scratch) {
            if (s.inner == 1) {  // the threads' columns merged as arrays
                const MomentsColumns total = merge_thread_columns(c_begin - blk.first, c_end - c_begin, scratch);
                for (std::int64_t c = c_begin; c < c_end; ++c) finish(c, total.at(c - c_begin));
                return;
            }
            for (std::int64_t c = c_begin; c < c_end; ++c) finish(c, channel_moments(s, c, blk, scratch));
        },
        [](std::int64_t, std::int64_t, const ColumnBlock&) {});
}

// Per-column values of one column block: a channel's value repeated over its inner columns,
// for the kernels that vectorize across columns.
template <class T>
class PerColumn {
public:
    explicit PerColumn(const Shape& s)
        : inner_(s.inner), values_(std::size_t(std::min(s.channels * s.inner, std::max(kBlockColumns, s.inner)))) {}
    void set(const ColumnBlock& b, std::int64_t c, T value) {
        if (inner_ == 1)  // channels-last input: one column per channel, and a call per channel
            values_[std::size_t(c - b.first)] = value;
        else
            std::fill_n(values_.begin() + (c - b.first) * inner_, inner_, value);
    }
    const T* data() const { return values_.data(); }
    T* data() { return values_.data(); }

private:
    std::int64_t inner_;
    std::vector<T> values_;
};

// Calls apply(offset, rows, cols, factors, writes), the apply kernel over `rows` rows of `cols`
// values `ld` apart from value `offset` of the range (the output y), with per-column factor
// arrays. A streamed output (output_writes) is written by non-temporal stores only where every
// row begins on a cache line (streams_rows): rows of whole lines (ld == cols, ld values a whole
// number of lines) whose first one does not begin on a line are taken from the first line
// boundary, h values in, as rows of the same width whose factors are rotated by h; the h values
// before it and the last row's rest take plain stores. (NumPy's large arrays begin 16 bytes past
// a page; torch's on a line.)
template <class T, std::size_t N, class Apply>
void apply_rows(const T* y, std::int64_t rows, std::int64_t cols, std::int64_t ld, Writes writes,
                const std::array<const compute_t<T>*, N>& factors, Apply&& apply) {
    const std::int64_t h = values_before_line(y, cols);
    const bool rotate = writes == Writes::streamed && cols == ld && ld * std::int64_t(sizeof(T)) % kLineBytes == 0 &&
                        h > 0 && h < cols && rows > 1;
    if (!rotate) return apply(std::int64_t(0), rows, cols, factors, writes);
    thread_local std::vector<compute_t<T>> rotated;
    rotated.resize(N * std::size_t(cols));
    std::array<const compute_t<T>*, N> shifted, rest;
    for (std::size_t i = 0; i < N; ++i) {
        compute_t<T>* r = rotated.data() + i * std::size_t(cols);
        std::rotate_copy(factors[i], factors[i] + h, factors[i] + cols, r);
        shifted[i] = r;
        rest[i] = factors[i] + h;
    }
    apply(std::int64_t(0), std::int64_t(1), h, factors, Writes::cached);
    apply(h, rows - 1, cols, shifted, writes);
    apply((rows - 1) * ld + h, std::int64_t(1), cols - h, rest, Writes::cached);
}

// The normalize (then ReLU when relu) and the gradient apply over rows [b, e) of a column
// block, through apply_rows.
template <class T>
void affine_block_rows(const KernelTable<T>& k, const T* x, T* y, std::int64_t b, std::int64_t e,
                       const ColumnBlock& blk, Writes writes, const compute_t<T>* shift, const compute_t<T>* alpha,
                       const compute_t<T>* beta, bool relu) {
    const std::int64_t at = b * blk.ld + blk.col;
    apply_rows<T, 3>(y + at, e - b, blk.cols, blk.ld, writes, {shift, alpha, beta},
                     [&](std::int64_t o, std::int64_t rows, std::int64_t cols, const auto& f, Writes w) {
                         k.cl_affine(x + at + o, nullptr, y + at + o, rows, cols, blk.ld, f[0], f[1], f[2], relu, w);
                     });
}

template <class T>
void grad_block_rows(const KernelTable<T>& k, const T* dy, const T* x, T* gx, std::int64_t b, std::int64_t e,
                     const ColumnBlock& blk, Writes writes, const compute_t<T>* shift, const compute_t<T>* k_coef,
                     const compute_t<T>* m_coef, const compute_t<T>* q_coef) {
    const std::int64_t at = b * blk.ld + blk.col;
    apply_rows<T, 4>(gx + at, e - b, blk.cols, blk.ld, writes, {shift, k_coef, m_coef, q_coef},
                     [&](std::int64_t o, std::int64_t rows, std::int64_t cols, const auto& f, Writes w) {
                         k.cl_grad(dy + at + o, x + at + o, gx + at + o, rows, cols, blk.ld, f[0], f[1], f[2], f[3], w);
                     });
}

// Statistics, finish(c, Moments) -> ChannelAffine<compute_t<T>>, and normalize (then ReLU when
// relu), each thread its rows. With one column per channel (inner 1), a range of channels is
// finished at once, finish.channels(c, count, moments, shift, alpha, beta), the moments and
// the factors as arrays.
template <class T, class Finish>
void normalize_channels_last(const KernelTable<T>& k, const T* x, T* y, const Shape& s, bool relu,
                             Finish&& finish) {
    PerColumn<compute_t<T>> shift(s), alpha(s), beta(s);
    const Writes writes = output_writes<T>(s, 2, s.size());  // rows of a tile are one run
    const BlockReads reads = block_reads<T>(s, 1, 2);
    for_each_row_block<T>(
        s, parallel_bytes<T>(kNormalizeArrays, s.size()),
        [&](std::int64_t b, std::int64_t e, const ColumnBlock& blk, ColumnScratch<T>& w) {
            block_moments(k, x, b, e, blk, w, reads);
        },
        [&](std::int64_t c_begin, std::int64_t c_end, const ColumnBlock& blk, auto& scratch) {
            if (s.inner == 1) {
                const std::int64_t j0 = c_begin - blk.first, n = c_end - c_begin;
                finish.channels(c_begin, n, merge_thread_columns(j0, n, scratch), shift.data() + j0,
                                alpha.data() + j0, beta.data() + j0);
                return;
            }
            for (std::int64_t c = c_begin; c < c_end; ++c) {
                const ChannelAffine<compute_t<T>> a = finish(c, channel_moments(s, c, blk, scratch));
                shift.set(blk, c, a.shift);
                alpha.set(blk, c, a.alpha);
                beta.set(blk, c, a.beta);
            }
        },
        [&](std::int64_t b, std::int64_t e, const ColumnBlock& blk) {
            affine_block_rows(k, x, y, b, e, blk, writes, shift.data(), alpha.data(), beta.data(), relu);
        });
}

// Backward reduce {sum(dy), sum(dy*(x - shift[c]))}, finish(c, Sums) -> GradCoefficients<compute_t<T>>,
// and the gradient apply (skipped when gx is null). With one column per channel (inner 1), a range
// of channels is finished at once: finish.channels(c, count, sum_dy, sum_dy_xmu, shift, k, m, q).
template <class T, class Finish>
void backward_channels_last(const KernelTable<T>& k, const T* dy, const T* x, T* gx, const Shape& s,
                            const compute_t<T>* shift_of, Finish&& finish) {
    PerColumn<compute_t<T>> shift(s), k_coef(s), m_coef(s), q_coef(s);
    const Writes writes = output_writes<T>(s, 3, s.size());
    const BlockReads reads = block_reads<T>(s, 2, 3);
    for_each_row_block<T>(
        s, parallel_bytes<T>(kBackwardArrays, s.size()),
        [&](std::int64_t b, std::int64_t e, const ColumnBlock& blk, ColumnScratch<T>& w) {
            // Every thread fills the block's shifts with the same values before reading them.
            if (s.inner == 1)
                std::copy_n(shift_of + blk.first, blk.count, w.shift.begin());
            else
                for (std::int64_t c = blk.first; c < blk.first + blk.count; ++c)
                    std::fill_n(w.shift.begin() + (c - blk.first) * s.inner, s.inner, shift_of[c]);
            std::fill_n(w.s1.begin(), blk.cols, 0.0);
            std::fill_n(w.s2.begin(), blk.cols, 0.0);
            const std::int64_t at = b * blk.ld + blk.col;
            checked_cl_dot(k, dy + at, x + at, e - b, blk.cols, blk.ld, w.shift.data(), w.s1.data(), w.s2.data(),
                           reads);
        },
        [&](std::int64_t c_begin, std::int64_t c_end, const ColumnBlock& blk, auto& scratch) {
            if (s.inner == 1) {  // one column per channel: the threads' sums added as arrays, in the first's
                const std::size_t j0 = std::size_t(c_begin - blk.first), n = std::size_t(c_end - c_begin);
                double *sdy = scratch[0].s1.data() + j0, *sdyx = scratch[0].s2.data() + j0;
                for (std::size_t t = 1; t < scratch.size(); ++t)
                    for (std::size_t i = 0; i < n; ++i) {
                        sdy[i] += scratch[t].s1[j0 + i];
                        sdyx[i] += scratch[t].s2[j0 + i];
                    }
                finish.channels(c_begin, std::int64_t(n), sdy, sdyx, shift.data() + j0, k_coef.data() + j0,
                                m_coef.data() + j0, q_coef.data() + j0);
                return;
            }
            for (std::int64_t c = c_begin; c < c_end; ++c) {
                Sums sums;
                const std::int64_t j0 = (c - blk.first) * s.inner;
                for (const auto& w : scratch)
                    for (std::int64_t j = j0; j < j0 + s.inner; ++j) sums += Sums{w.s1[std::size_t(j)], w.s2[std::size_t(j)]};
                const GradCoefficients<compute_t<T>> g = finish(c, sums);
                shift.set(blk, c, g.shift);
                k_coef.set(blk, c, g.k);
                m_coef.set(blk, c, g.m);
                q_coef.set(blk, c, g.q);
            }
        },
        [&](std::int64_t b, std::int64_t e, const ColumnBlock& blk) {
            if (gx)
                grad_block_rows(k, dy, x, gx, b, e, blk, writes, shift.data(), k_coef.data(), m_coef.data(),
                                q_coef.data());
        });
}

template <class T>
void eval_channels_last(const KernelTable<T>& k, const T* x, const T* residual, T* y,
                        const Shape& s, const compute_t<T>* shift, const compute_t<T>* alpha,
                        const compute_t<T>* beta, bool relu) {
    const std::int64_t rows = s.outer, cols = s.channels * s.inner;
    const int inputs = residual ? 3 : 2;
    const int threads = threads_for(parallel_bytes<T>(inputs, s.size()), rows);
    const Writes writes = output_writes<T>(s, inputs, s.size());
    run_parallel(threads, [&] {
        const auto [b, e] = my_share(rows);
        if (b >= e) return;
        const std::int64_t at = b * cols;
        apply_rows<T, 3>(y + at, e - b, cols, cols, writes, {shift, alpha, beta},
                         [&](std::int64_t o, std::int64_t n, std::int64_t width, const auto& f, Writes w) {
                             k.cl_affine(x + at + o, residual ? residual + at + o : nullptr, y + at + o, n, width,
                                         cols, f[0], f[1], f[2], relu, w);
                         });
    });
}

}  // namespace batchnorm::detail
