// Channels-first inputs whose planes are short (7x7 to 28x28: at most kMaxBlockPlaneBytes).
// Channel by channel (channels_first.hpp), such a channel costs more in fixed work than in
// data: a probe of scattered values, a kernel call, horizontal sums and a dependent chain of
// divisions, each paid per channel or per plane, while the prefetchers lose the thread at
// every short plane.
// Here channels go in blocks that fit a tile of the L2: one kernel call streams the block's
// rows in memory order (pb_*), the block's channels are finished together, and the apply reads
// the block again while it is in cache; a training call whose arrays live in the L3 goes in two
// passes instead (in_two_passes: the statistics here, the apply as eval's). Threads take whole
// blocks. No norm semantics here: callers pass the finish step, as to the other drivers.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../kernels/table.hpp"
#include "../shape.hpp"
#include "../threads.hpp"
#include "affine.hpp"
#include "cache.hpp"
#include "overflow.hpp"

namespace batchnorm::detail {

// How a channels-first operation shares out: its threads, and the parts each channel is cut
// into (1: whole channels; more when there are too few channels for the threads).
struct ChannelSchedule {
    int threads;
    std::int64_t parts;
};

// Planes up to a page go in blocks, whatever the ISA's vector width. The limit was once 16
// vectors (1 KiB with AVX-512, 512 B with AVX2), so a 14x14 float32 plane took the channel
// path on AVX2 machines only. AMD EPYC (Zen 3, AVX2, 512 KiB L2), 1 thread, float32, best of
// 15: backward 8x256x14x14 185 -> 142 us, 32x256x14x14 2052 -> 1364 us; training 135 -> 113
// and 973 -> 639 us.
constexpr std::int64_t kMaxBlockPlaneBytes = 4096;

// Channels per block and blocks: as many channels as let the block's `arrays` (inputs and
// output) fit a tile (half the per-core L2, tile_values), a multiple of the threads in blocks so
// each thread gets the same number, and equal blocks. blocks == 0: the shape does not go in
// blocks (planes longer than kMaxBlockPlaneBytes, a channel larger than a tile, or channels
// cut into parts).
struct PlaneBlocks {
    std::int64_t per_block = 0, blocks = 0;
};

// `channels` in equal blocks of at most `fit` (at least 1), a multiple of `threads` in number
// where there are channels enough.
inline PlaneBlocks even_blocks(std::int64_t channels, std::int64_t fit, int threads) {
    const std::int64_t wanted = (channels + fit - 1) / fit;
    const std::int64_t blocks = std::min(channels, (wanted + threads - 1) / threads * threads);
    return {(channels + blocks - 1) / blocks, blocks};
}

template <class T>
PlaneBlocks plane_blocks(const Shape& s, const ChannelSchedule& sched, int arrays) {
    const std::int64_t channel_bytes = std::int64_t(arrays) * s.per_channel() * std::int64_t(sizeof(T));
    const std::int64_t tile_bytes = tile_values<T>() * std::int64_t(sizeof(T));
    if (sched.parts != 1 || s.inner * std::int64_t(sizeof(T)) > kMaxBlockPlaneBytes || channel_bytes > tile_bytes)
        return {};
    return even_blocks(s.channels, tile_bytes / std::max<std::int64_t>(channel_bytes, 1), sched.threads);
}

// Whether a fused operation on short planes (reduce a block of channels, then apply to it while
// it is in the L2) goes better as two passes over the whole array, the reduce in blocks and the
// apply in memory order: when each thread's share of the `arrays` (inputs and output) is more
// than kTwoPassL2s of its L2, but not so large that the planes are prefetched (those come from
// memory, and the fused block saves reading them twice). In the L3 the fused apply's short runs,
// a block's planes a row apart, cost more than a second, streaming read: AMD EPYC Zen 4 (1 MiB
// L2, 32 MiB L3), 1 thread, float32 training, bench/cpp/ab_timing.cpp, 11 interleaved rounds in
// either order (fused -> two passes): 32x64x28x28 348-493 -> 299-351 us, 32x256x14x14 322-330
// -> 301-302, 128x256x7x7 447-483 -> 380-385. Below the threshold the fused block wins
// (separate runs: 32x256x7x7 80 -> 85 us, 8x256x14x14 69 -> 74); past the prefetch threshold
// neither wins everywhere (64x256x14x14 1501 -> 1684 us, 32x256x28x28 4080 -> 2831).
constexpr std::int64_t kTwoPassL2s = 4;

template <class T>
bool in_two_passes(const Shape& s, int arrays, int threads) {
    const std::int64_t per_thread = std::int64_t(arrays) * s.size() * std::int64_t(sizeof(T)) / std::max(threads, 1);
    return per_thread > kTwoPassL2s * cache_sizes().l2 && !prefetch_planes<T>(s, arrays);
}

// Per-thread buffers of one block's channels.
template <class T>
struct BlockScratch {
    std::vector<double> s1, s2, moment_shift, offset, m2;
    std::vector<compute_t<T>> shift, a, b, c;

    void resize(std::int64_t n) {  // the sums are cleared before each use (clear_sums)
        for (auto* v : {&s1, &s2, &moment_shift, &offset, &m2}) v->resize(std::size_t(n));
        for (auto* v : {&shift, &a, &b, &c}) v->resize(std::size_t(n));
    }
    // The block's moments, from the sums around `shift` of `values` values per channel.
    MomentsColumns moments(std::int64_t count, double values) {
        MomentsColumns m{0, moment_shift.data(), offset.data(), m2.data()};
        merge_shifted_sums(m, count, values, shift.data(), s1.data(), s2.data());
        return m;
    }
    void clear_sums() {
        std::fill(s1.begin(), s1.end(), 0.0);
        std::fill(s2.begin(), s2.end(), 0.0);
    }
};

// body(first, count, scratch) for every block of channels, each by one thread.
template <class T, class Body>
void for_each_plane_block(const ChannelSchedule& sched, const PlaneBlocks& pb, std::int64_t channels, Body&& body) {
    run_parallel(sched.threads, [&] {
        thread_local BlockScratch<T> scratch;
        scratch.resize(pb.per_block);
        BATCHNORM_OMP(for schedule(static))
        for (std::int64_t b = 0; b < pb.blocks; ++b) {
            const std::int64_t first = b * pb.per_block, count = std::min(pb.per_block, channels - first);
            if (count > 0) body(first, count, scratch);
        }
    });
}

// Where value i of a block's channel j lies, from the block's start: row i / len, position
// i % len, the block's planes one after another in each row.
inline std::int64_t block_offset(std::int64_t len, std::int64_t stride, std::int64_t i, std::int64_t j) {
    return (i / len) * stride + j * len + i % len;
}

// Values whose mean gives each channel's shift: spread over the channel's rows and over the
// plane, so ordered data (one image after another) still give a shift near the mean.
constexpr std::int64_t kBlockProbe = 8;

// The deviation sums of the block's channels [j0, j1) (the block starts at channel `first`)
// around w.shift, added to w.s1 and w.s2, with the float64 fallback for float32 lanes that
// overflowed.
template <class T>
void block_dev(const KernelTable<T>& k, const T* x, const Shape& s, std::int64_t first, std::int64_t j0,
               std::int64_t j1, BlockScratch<T>& w, BlockReads reads) {
    const std::int64_t len = s.inner, stride = s.channels * s.inner;
    const T* xb = x + (first + j0) * len;
    compute_t<T>* shift = w.shift.data() + j0;
    k.pb_dev(xb, s.outer, stride, j1 - j0, len, shift, w.s1.data() + j0, w.s2.data() + j0, reads);
    const auto dev = [&](std::int64_t i, std::int64_t j) {
        return double(xb[block_offset(len, stride, i, j)]) - double(shift[j]);
    };
    recheck_columns<T>(s.per_channel(), j1 - j0, w.s1.data() + j0, w.s2.data() + j0, dev, dev);
}

// Sums of channels [first, first + count) around w.shift into w.s1 and w.s2: one pass around a
// probe's mean, and a second around their own means for the channels where the probe was more
// than a standard deviation off.
template <class T>
void block_sums(const KernelTable<T>& k, const T* x, const Shape& s, std::int64_t first, std::int64_t count,
                BlockScratch<T>& w, BlockReads reads) {
    const std::int64_t len = s.inner, stride = s.channels * s.inner, n = s.per_channel();
    const std::int64_t probes = std::min(n, kBlockProbe);
    std::int64_t at[kBlockProbe];
    for (std::int64_t i = 0; i < probes; ++i) {
        const std::int64_t value = (2 * i + 1) * n / (2 * probes);  // evenly over (row, position)
        at[i] = block_offset(len, stride, value, 0);
    }
    const T* xb = x + first * len;
    const double inv_probes = 1.0 / double(probes);
    for (std::int64_t j = 0; j < count; ++j) {
        double even = 0, odd = 0;  // two chains: a channel's probes are summed twice as fast
        std::int64_t i = 0;
        for (; i + 1 < probes; i += 2) {
            even += double(xb[j * len + at[i]]);
            odd += double(xb[j * len + at[i + 1]]);
        }
        if (i < probes) even += double(xb[j * len + at[i]]);
        w.shift[std::size_t(j)] = compute_t<T>(finite_shift((even + odd) * inv_probes));
    }
    w.clear_sums();
    block_dev(k, x, s, first, 0, count, w, reads);
    resum_far_columns(count, 1, double(n), w.shift.data(), w.s1.data(), w.s2.data(),
                      [&](std::int64_t j0, std::int64_t j1) {  // the block is in cache now
                          block_dev(k, x, s, first, j0, j1, w, BlockReads::streamed);
                      });
}

// The moments of channels [first, first + count), handed to finish(c, Moments) one by one.
template <class T, class Finish>
void block_moments(const KernelTable<T>& k, const T* x, const Shape& s, std::int64_t first, std::int64_t count,
                   BlockScratch<T>& w, BlockReads reads, Finish&& finish) {
    block_sums(k, x, s, first, count, w, reads);
    const MomentsColumns m = w.moments(count, double(s.per_channel()));
    for (std::int64_t j = 0; j < count; ++j) finish(first + j, m.at(j));
}

// Moments of every channel, finish(c, Moments).
template <class T, class Finish>
void moments_plane_blocks(const KernelTable<T>& k, const T* x, const Shape& s, const ChannelSchedule& sched,
                          const PlaneBlocks& pb, Finish&& finish) {
    const BlockReads reads = block_reads<T>(s, 1, 1);
    for_each_plane_block<T>(sched, pb, s.channels, [&](std::int64_t first, std::int64_t count, BlockScratch<T>& w) {
        block_moments(k, x, s, first, count, w, reads, finish);
    });
}

// Statistics of every channel in blocks sized for x alone, and finish.channels(first, count,
// moments, shift, alpha, beta) into the whole-array factors: the first of the two passes
// (in_two_passes) whose second is the eval apply.
template <class T, class Finish>
void factors_plane_blocks(const KernelTable<T>& k, const T* x, const Shape& s, const ChannelSchedule& sched,
                          Finish&& finish, compute_t<T>* shift, compute_t<T>* alpha, compute_t<T>* beta) {
    const BlockReads reads = block_reads<T>(s, 1, 1);
    for_each_plane_block<T>(sched, plane_blocks<T>(s, sched, 1), s.channels,
                            [&](std::int64_t first, std::int64_t count, BlockScratch<T>& w) {
                                block_sums(k, x, s, first, count, w, reads);
                                finish.channels(first, count, w.moments(count, double(s.per_channel())),
                                                shift + first, alpha + first, beta + first);
                            });
}

// Statistics, finish.channels(first, count, moments, shift, alpha, beta) for the block's
// channels at once (TrainFinish: its square roots and divisions in vector lanes; one at a
// time they were a fifth of an 8x512x7x7 training call), and normalize (then ReLU when relu),
// per block, while the block is in cache.
template <class T, class Finish>
void normalize_plane_blocks(const KernelTable<T>& k, const T* x, T* y, const Shape& s, const ChannelSchedule& sched,
                            const PlaneBlocks& pb, bool relu, Finish&& finish) {
    const std::int64_t len = s.inner, stride = s.channels * s.inner;
    const Writes writes = output_writes<T>(s, 2, len);
    const BlockReads reads = block_reads<T>(s, 1, 2);
    for_each_plane_block<T>(sched, pb, s.channels, [&](std::int64_t first, std::int64_t count, BlockScratch<T>& w) {
        block_sums(k, x, s, first, count, w, reads);
        finish.channels(first, count, w.moments(count, double(s.per_channel())), w.shift.data(), w.a.data(),
                        w.b.data());
        const std::int64_t at = first * len;
        k.pb_affine(x + at, y + at, s.outer, stride, count, len, w.shift.data(), w.a.data(), w.b.data(), relu,
                    writes);
    });
}

// Backward reduce {sum(dy), sum(dy*(x - shift[c]))}, finish.channels(first, count, sum_dy,
// sum_dy_xmu, shift, k, m, q) for the block's channels at once, and the gradient apply
// (skipped when gx is null), per block. (Not in two passes, as training may go: the second
// pass reading dy and x again cost 3-12 % at every size measured, 32x256x7x7 to 64x256x14x14.)
template <class T, class Finish>
void backward_plane_blocks(const KernelTable<T>& k, const T* dy, const T* x, T* gx, const Shape& s,
                           const compute_t<T>* shift, const ChannelSchedule& sched, const PlaneBlocks& pb,
                           Finish&& finish) {
    const std::int64_t len = s.inner, stride = s.channels * s.inner;
    const Writes writes = output_writes<T>(s, 3, len);
    const BlockReads reads = block_reads<T>(s, 2, 3);
    for_each_plane_block<T>(sched, pb, s.channels, [&](std::int64_t first, std::int64_t count, BlockScratch<T>& w) {
        const std::int64_t at = first * len;
        w.clear_sums();
        k.pb_dot(dy + at, x + at, s.outer, stride, count, len, shift + first, w.s1.data(), w.s2.data(), reads);
        recheck_columns<T>(
            s.per_channel(), count, w.s1.data(), w.s2.data(),
            [&](std::int64_t i, std::int64_t j) { return double(dy[at + block_offset(len, stride, i, j)]); },
            [&](std::int64_t i, std::int64_t j) {
                return double(x[at + block_offset(len, stride, i, j)]) - double(shift[first + j]);
            });
        finish.channels(first, count, w.s1.data(), w.s2.data(), w.shift.data(), w.a.data(), w.b.data(), w.c.data());
        if (gx)
            k.pb_grad(dy + at, x + at, gx + at, s.outer, stride, count, len, w.shift.data(), w.a.data(), w.b.data(),
                      w.c.data(), writes);
    });
}

}  // namespace batchnorm::detail
