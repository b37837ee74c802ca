// Per-channel moments in float64 and Chan's parallel merge. The same merge combines the tiles
// of one channel, the partials of several threads and, later, of several processes.
#pragma once

#include <algorithm>

namespace batchnorm::detail {

struct Moments {
    double count = 0;
    double mean = 0;
    double m2 = 0;  // sum of squared deviations from mean

    double biased_var() const { return m2 / count; }
    double unbiased_var() const { return m2 / (count - 1); }
};

// Chan, Golub & LeVeque: exact in exact arithmetic, and stable because it only ever adds
// non-negative sums of squares and a correction that is small when the means agree.
inline Moments merge(const Moments& a, const Moments& b) {
    if (a.count == 0) return b;
    if (b.count == 0) return a;
    const double n = a.count + b.count;
    const double delta = b.mean - a.mean;
    return {n, a.mean + delta * (b.count / n), a.m2 + b.m2 + delta * delta * (a.count * b.count / n)};
}

// Moments from sums of deviations from a shift close to the mean:
// s1 = sum(x - shift), s2 = sum((x - shift)^2). The correction s1^2/n is tiny because the
// shift is the block's own (rounded) mean, so nothing cancels.
inline Moments from_shifted_sums(double count, double shift, double s1, double s2) {
    if (count == 0) return {};
    return {count, shift + s1 / count, std::max(0.0, s2 - s1 * s1 / count)};
}

// Whether sums around `shift` give the variance without losing digits: the correction
// s1^2/n may cancel at most half of s2, i.e. the shift is within one standard deviation of the
// mean. Otherwise the caller sums again around the mean that s1 reveals.
inline bool shift_is_close(double count, double s1, double s2) { return 2 * s1 * s1 <= s2 * count; }

// Two sums that reductions return together, in float64.
struct Sums {
    double first = 0;
    double second = 0;

    Sums& operator+=(const Sums& o) {
        first += o.first;
        second += o.second;
        return *this;
    }
};

}  // namespace batchnorm::detail
