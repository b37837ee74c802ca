// Channels-first driver: segments of `inner`-long contiguous planes (NCHW, NCL, NCDHW; a
// group or instance segment is Shape{1, segments, values}). Threads take whole segments, or
// equal parts of them when there are too few to share out. A fused step reads each segment's
// block from memory once: statistics (two passes) and the apply run back to back while the
// block is still in cache. No norm semantics here: callers pass the finish step.
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
#include "plane_blocks.hpp"

namespace batchnorm::detail {

// A channel part smaller than this is not worth a thread of its own.
constexpr std::int64_t kMinPartValues = 16 << 10;

// Calls f(offset, count, len, stride) for the values [begin, end) of channel c, taken in
// flattened (outer, inner) order, as at most three runs of equally spaced planes.
template <class F>
void for_each_run(const Shape& s, std::int64_t c, std::int64_t begin, std::int64_t end, F&& f) {
    const std::int64_t stride = s.channels * s.inner;
    if (begin == 0 && end == s.per_channel()) {  // the whole channel: no divisions needed
        if (end > 0) f(c * s.inner, s.outer, s.inner, stride);
        return;
    }
    const auto offset = [&](std::int64_t value) {
        return (value / s.inner) * stride + c * s.inner + value % s.inner;
    };
    if (begin < end && begin % s.inner != 0) {
        const std::int64_t len = std::min(s.inner - begin % s.inner, end - begin);
        f(offset(begin), std::int64_t(1), len, stride);
        begin += len;
    }
    const std::int64_t planes = (end - begin) / s.inner;
    if (planes > 0) {
        f(offset(begin), planes, s.inner, stride);
        begin += planes * s.inner;
    }
    if (begin < end) f(offset(begin), std::int64_t(1), end - begin, stride);
}

// Values whose mean gives the first tile's shift: one per 64 values of the tile, from 8 to 16.
// Eight samples put the shift within about a third of a standard deviation of the mean, far
// inside the one deviation that the single pass allows. Each is a scattered load that misses,
// and the pass waits for them all: 64 were an eighth of the statistics of 1x256x6272 float32
// (AMD EPYC Zen 4, 1 thread: 113 -> 98 us with 16).
constexpr std::int64_t kMinProbe = 8, kMaxProbe = 16;

// Mean of a few values spread evenly over channel c's [begin, end): a shift near the mean even
// when the values are ordered (sorted, or one image after another).
template <class T>
double probe_mean(const T* x, const Shape& s, std::int64_t c, std::int64_t begin, std::int64_t end) {
    const std::int64_t n = end - begin;
    const std::int64_t k = std::min(n, std::clamp(n / 64, kMinProbe, kMaxProbe)), step = n / k;
    const std::int64_t stride = s.channels * s.inner, step_planes = step / s.inner, step_values = step % s.inner;
    const T* plane = x + (begin / s.inner) * stride + c * s.inner;
    std::int64_t i = begin % s.inner;
    double sum = 0;
    for (std::int64_t taken = 0; taken < k; ++taken) {  // (plane, i) advance by `step` values
        sum += double(plane[i]);
        plane += step_planes * stride;
        i += step_values;
        if (i >= s.inner) {
            i -= s.inner;
            plane += stride;
        }
    }
    return sum / double(k);
}

// Sums of deviations of channel c's values [begin, end) from shift.
template <class T>
Sums range_dev(const KernelTable<T>& k, const T* x, const Shape& s, std::int64_t c, std::int64_t begin,
               std::int64_t end, compute_t<T> shift, bool prefetch) {
    Sums dev;
    for_each_run(s, c, begin, end, [&](std::int64_t at, std::int64_t n, std::int64_t len, std::int64_t stride) {
        dev += checked_dev(k, x + at, n, len, stride, shift, prefetch);
    });
    return dev;
}

// Moments of channel c over [begin, end), one pass per tile in the usual case: deviations from
// a shift near the mean (a probe's mean, then the mean of the tiles so far) give exact moments
// through the correction s1^2/n. A shift more than a standard deviation off (data that drift)
// costs a second pass around the tile's own mean, while the tile is in cache. Tiles merge with
// Chan's formula.
template <class T>
Moments range_moments(const KernelTable<T>& k, const T* x, const Shape& s, std::int64_t c,
                      std::int64_t begin, std::int64_t end, bool prefetch) {
    Moments total;
    const std::int64_t tile = tile_values<T>();
    for (std::int64_t t = begin; t < end; t += tile) {
        const std::int64_t t_end = std::min(end, t + tile);
        const double count = double(t_end - t);
        compute_t<T> shift = compute_t<T>(finite_shift(total.count == 0 ? probe_mean(x, s, c, t, t_end) : total.mean()));
        Sums dev = range_dev(k, x, s, c, t, t_end, shift, prefetch);
        if (!shift_is_close(count, dev.first, dev.second)) {
            shift = compute_t<T>(finite_shift(double(shift) + dev.first / count));
            dev = range_dev(k, x, s, c, t, t_end, shift, false);  // the tile is in cache
        }
        total = merge(total, from_shifted_sums(count, double(shift), dev.first, dev.second));
    }
    return total;
}

template <class T>
Sums range_dot(const KernelTable<T>& k, const T* dy, const T* x, const Shape& s, std::int64_t c,
               std::int64_t begin, std::int64_t end, compute_t<T> shift, bool prefetch) {
    Sums total;
    for_each_run(s, c, begin, end, [&](std::int64_t at, std::int64_t n, std::int64_t len, std::int64_t stride) {
        total += checked_dot(k, dy + at, x + at, n, len, stride, shift, prefetch);
    });
    return total;
}

inline Sums merge(const Sums& a, const Sums& b) {
    Sums total = a;
    return total += b;
}

// The shared shape of every channels-first operation: reduce each (channel, part) item to a
// partial R, merge a channel's partials and finish the channel (once, by one thread), then
// apply over each item. With one part per channel the three steps run back to back per
// channel, so the channel's block is still in cache for `apply`; with several parts, barriers
// separate them and the static schedule gives each thread the same items in both loops.
// Each thread then calls after(), once, before the threads join (the row drivers' fence).
inline ChannelSchedule schedule_channels(const Shape& s, std::int64_t bytes) {
    const std::int64_t n = s.per_channel();
    const int threads = threads_for(bytes, s.channels * std::max<std::int64_t>(1, n / kMinPartValues));
    return {threads, channel_splits(s.channels, n, threads, kMinPartValues)};
}

struct NoAfter {
    void operator()() const {}
};

template <class R, class Reduce, class Finish, class Apply, class After = NoAfter>
void for_each_channel(const Shape& s, const ChannelSchedule& sched, Reduce&& reduce, Finish&& finish,
                      Apply&& apply, After&& after = After{}) {
    const std::int64_t n = s.per_channel(), channels = s.channels;
    const int threads = sched.threads;
    const std::int64_t parts = sched.parts;
    if (parts == 1) {
        run_parallel(threads, [&] {
            BATCHNORM_OMP(for schedule(static) nowait)
            for (std::int64_t c = 0; c < channels; ++c) {
                finish(c, reduce(c, std::int64_t(0), n));
                apply(c, std::int64_t(0), n);
            }
            after();
        });
        return;
    }
    const std::int64_t items = channels * parts;
    const auto bounds = [&](std::int64_t item) {
        const std::int64_t part = item % parts;
        return std::pair<std::int64_t, std::int64_t>{n * part / parts, n * (part + 1) / parts};
    };
    std::vector<R> partials(std::size_t(items), R{});
    run_parallel(threads, [&] {
        BATCHNORM_OMP(for schedule(static))
        for (std::int64_t item = 0; item < items; ++item) {
            const auto [begin, end] = bounds(item);
            partials[std::size_t(item)] = reduce(item / parts, begin, end);
        }
        BATCHNORM_OMP(for schedule(static))
        for (std::int64_t c = 0; c < channels; ++c) {
            R total{};
            for (std::int64_t p = 0; p < parts; ++p) total = merge(total, partials[std::size_t(c * parts + p)]);
            finish(c, total);
        }
        BATCHNORM_OMP(for schedule(static) nowait)
        for (std::int64_t item = 0; item < items; ++item) {
            const auto [begin, end] = bounds(item);
            apply(item / parts, begin, end);
        }
        after();
    });
}

template <class R, class Reduce, class Finish, class Apply, class After = NoAfter>
void for_each_channel(const Shape& s, std::int64_t bytes, Reduce&& reduce, Finish&& finish, Apply&& apply,
                      After&& after = After{}) {
    for_each_channel<R>(s, schedule_channels(s, bytes), reduce, finish, apply, after);
}

struct NoApply {
    void operator()(std::int64_t, std::int64_t, std::int64_t) const {}
};

// Moments of every channel (segment), handed to finish(c, Moments).
template <class T, class Finish>
void moments_channels_first(const KernelTable<T>& k, const T* x, const Shape& s, Finish&& finish) {
    const ChannelSchedule sched = schedule_channels(s, parallel_bytes<T>(1, s.size()));
    const PlaneBlocks pb = plane_blocks<T>(s, sched, 1);
    if (pb.blocks > 0) return moments_plane_blocks(k, x, s, sched, pb, finish);
    const bool prefetch = prefetch_planes<T>(s, 1);
    for_each_channel<Moments>(
        s, sched,
        [&](std::int64_t c, std::int64_t b, std::int64_t e) { return range_moments(k, x, s, c, b, e, prefetch); },
        finish, NoApply{});
}

// Eval: planes in memory order, split evenly across threads.
template <class T>
void eval_channels_first(const KernelTable<T>& k, const T* x, const T* residual, T* y,
                         const Shape& s, const compute_t<T>* shift, const compute_t<T>* alpha,
                         const compute_t<T>* beta, bool relu) {
    const std::int64_t planes = s.outer * s.channels;
    const int inputs = residual ? 3 : 2;
    const int threads = threads_for(parallel_bytes<T>(inputs, s.size()), planes);
    const Writes writes = output_writes<T>(s, inputs, s.inner);
    run_parallel(threads, [&] {
        const auto [begin, end] = my_share(planes);
        const std::int64_t at = begin * s.inner;
        if (begin < end)
            k.rows_affine(x + at, residual ? residual + at : nullptr, y + at, end - begin, s.inner,
                          begin % s.channels, s.channels, shift, alpha, beta, relu, writes);
    });
}

// Statistics, finish(c, Moments) -> ChannelAffine<compute_t<T>>, and normalize (then ReLU when
// relu), fused per channel.
// Its bytes for the thread count are those of both passes (kNormalizeArrays), as the
// channels-last driver counts them: counting one read kept (8,512,7,7) float32 training
// (0.8 MiB, about 55 us) on one thread where its channels-last twin ran on two.
template <class T, class Finish>
void normalize_channels_first(const KernelTable<T>& k, const T* x, T* y, const Shape& s, bool relu,
                              Finish&& finish) {
    const ChannelSchedule sched = schedule_channels(s, parallel_bytes<T>(kNormalizeArrays, s.size()));
    const PlaneBlocks pb = plane_blocks<T>(s, sched, 2);
    if (pb.blocks > 0 && in_two_passes<T>(s, 2, sched.threads)) {
        std::vector<compute_t<T>> factors(3 * std::size_t(s.channels));
        compute_t<T> *shift = factors.data(), *alpha = shift + s.channels, *beta = alpha + s.channels;
        factors_plane_blocks(k, x, s, sched, finish, shift, alpha, beta);
        return eval_channels_first<T>(k, x, nullptr, y, s, shift, alpha, beta, relu);
    }
    if (pb.blocks > 0) return normalize_plane_blocks(k, x, y, s, sched, pb, relu, finish);
    std::vector<ChannelAffine<compute_t<T>>> affine(std::size_t(s.channels));
    const bool prefetch = prefetch_planes<T>(s, 2);
    const Writes writes = output_writes<T>(s, 2, s.inner);
    for_each_channel<Moments>(
        s, sched,
        [&](std::int64_t c, std::int64_t b, std::int64_t e) { return range_moments(k, x, s, c, b, e, prefetch); },
        [&](std::int64_t c, const Moments& m) { affine[std::size_t(c)] = finish(c, m); },
        [&](std::int64_t c, std::int64_t b, std::int64_t e) {
            const ChannelAffine<compute_t<T>> a = affine[std::size_t(c)];
            for_each_run(s, c, b, e, [&](std::int64_t at, std::int64_t n, std::int64_t len, std::int64_t stride) {
                k.cf_affine(x + at, y + at, n, len, stride, a.shift, a.alpha, a.beta, relu, writes);
            });
        });
}

// Backward reduce {sum(dy), sum(dy*(x - shift[c]))}, finish(c, Sums) -> GradCoefficients<compute_t<T>>,
// and the gradient apply (skipped when gx is null), fused per channel.
template <class T, class Finish>
void backward_channels_first(const KernelTable<T>& k, const T* dy, const T* x, T* gx, const Shape& s,
                             const compute_t<T>* shift, Finish&& finish) {
    const ChannelSchedule sched = schedule_channels(s, parallel_bytes<T>(kBackwardArrays, s.size()));
    const PlaneBlocks pb = plane_blocks<T>(s, sched, 3);
    if (pb.blocks > 0) return backward_plane_blocks(k, dy, x, gx, s, shift, sched, pb, finish);
    std::vector<GradCoefficients<compute_t<T>>> coef(std::size_t(s.channels));
    const bool prefetch = prefetch_planes<T>(s, 3);
    const Writes writes = output_writes<T>(s, 3, s.inner);
    for_each_channel<Sums>(
        s, sched,
        [&](std::int64_t c, std::int64_t b, std::int64_t e) { return range_dot(k, dy, x, s, c, b, e, shift[c], prefetch); },
        [&](std::int64_t c, const Sums& sums) { coef[std::size_t(c)] = finish(c, sums); },
        [&](std::int64_t c, std::int64_t b, std::int64_t e) {
            if (!gx) return;
            const GradCoefficients<compute_t<T>> g = coef[std::size_t(c)];
            for_each_run(s, c, b, e, [&](std::int64_t at, std::int64_t cnt, std::int64_t len, std::int64_t stride) {
                k.cf_grad(dy + at, x + at, gx + at, cnt, len, stride, g.shift, g.k, g.m, g.q, writes);
            });
        });
}

}  // namespace batchnorm::detail
