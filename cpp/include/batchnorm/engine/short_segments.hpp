// Segments of a few values each: instance norm over 2-32 positions, group norm with short
// groups (in either memory layout), layer norm over short rows. The vector drivers pay per segment a probe, a
// kernel call, horizontal sums and a flush, many times the data here ((64, 1000, 2) float32
// instance norm: 53 ns a segment, torch's 8). Here each segment is a scalar loop over values
// already in L1: two passes in float64 for its moments (exact enough at any offset: no shift
// is needed), then its apply, segment after segment in memory order.
#pragma once

#include <cstdint>

#include "../threads.hpp"
#include "moments.hpp"

namespace batchnorm::detail {

// Segments up to this many values take this path. float32 group norm of (64, 1000, L), one
// group per channel, 1 thread, Intel Xeon, forward / backward ms against the vector drivers:
// L = 2: 0.6 / 1.0 against 3.5 / 2.4; L = 16: 1.4 / 1.6 against 3.6 / 2.4; L = 25: 2.0 / 2.1
// against 3.8 / 2.8; L = 36 about even; L = 49: 4.3 / 3.8 against 4.2 / 3.1.
constexpr std::int64_t kShortSegmentValues = 32;

inline bool is_short_segment(std::int64_t values) { return values <= kShortSegmentValues; }

// A segment's values: value i of its plane p at offset(p, i), p < planes, i < len. The
// offset is a compile-time form per layout (a runtime stride cost the contiguous case a
// fifth), e.g. [](p, i) { return p * len + i; }.

// Moments of a segment's values: their float64 mean, then the squared deviations from it.
template <class T, class Offset>
Moments short_moments(const T* x, std::int64_t planes, std::int64_t len, Offset&& offset) {
    double sum = 0;
    for (std::int64_t p = 0; p < planes; ++p)
        for (std::int64_t i = 0; i < len; ++i) sum += double(x[offset(p, i)]);
    const double n = double(planes * len), mean = sum / n;
    double m2 = 0;
    for (std::int64_t p = 0; p < planes; ++p)
        for (std::int64_t i = 0; i < len; ++i) {
            const double d = double(x[offset(p, i)]) - mean;
            m2 += d * d;
        }
    return {n, mean, 0.0, m2};
}

// {sum(dy), sum(dy*(x - mean))} over plane p of a segment, in float64.
template <class T, class P, class Offset>
Sums short_dot(const T* dy, const T* x, std::int64_t p, std::int64_t len, P mean, Offset&& offset) {
    Sums s;
    for (std::int64_t i = 0; i < len; ++i) {
        const double g = double(dy[offset(p, i)]);
        s.first += g;
        s.second += g * (double(x[offset(p, i)]) - double(mean));
    }
    return s;
}

// body(segment) for every segment, the threads sharing them in contiguous ranges; `bytes`:
// what the whole call moves (threads_for).
template <class Body>
void for_each_short_segment(std::int64_t segments, std::int64_t bytes, Body&& body) {
    run_parallel(threads_for(bytes, segments), [&] {
        const auto [b, e] = my_share(segments);
        for (std::int64_t sg = b; sg < e; ++sg) body(sg);
    });
}

}  // namespace batchnorm::detail
