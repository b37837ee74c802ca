// Per-channel moments in float64 and Chan's parallel merge. The same merge combines the tiles
// of one channel, the partials of several threads and, later, of several processes.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace batchnorm::detail {

// The mean is kept as shift + offset, with the shift near the mean: offsets are small, so the
// difference of two means in a merge keeps its digits even when the data sit far from zero
// (at 1e6, a plain mean carries an absolute error of 1e-10, which would reach the variance).
struct Moments {
    double count = 0;
    double shift = 0;   // a reference point near the mean
    double offset = 0;  // mean - shift
    double m2 = 0;      // sum of squared deviations from the mean

    double mean() const { return shift + offset; }
    double biased_var() const { return m2 / count; }
    double unbiased_var() const { return m2 / (count - 1); }
};

// The offset of two parts' mean from the first's shift, given each part's offset from that
// shift: their weighted mean. Not a_offset + (b_offset - a_offset) * b_weight, equal in exact
// arithmetic, which makes a part whose mean is +inf (data holding +inf) NaN: inf - inf.
inline double merged_offset(double a_offset, double b_offset, double a_weight, double b_weight) {
    return a_offset * a_weight + b_offset * b_weight;
}

// Chan, Golub & LeVeque: exact in exact arithmetic, and stable because it only ever adds
// non-negative sums of squares and a correction that is small when the means agree.
inline Moments merge(const Moments& a, const Moments& b) {
    if (a.count == 0) return b;
    if (b.count == 0) return a;
    const double n = a.count + b.count;
    const double b_offset = (b.shift - a.shift) + b.offset, delta = b_offset - a.offset;
    return {n, a.shift, merged_offset(a.offset, b_offset, a.count / n, b.count / n),
            a.m2 + b.m2 + delta * delta * (a.count * b.count / n)};
}

// Moments from sums of deviations from a shift close to the mean:
// s1 = sum(x - shift), s2 = sum((x - shift)^2). The correction s1^2/n is small when the shift
// is near the mean, so little cancels (see shift_is_close). NaN stays NaN.
inline Moments from_shifted_sums(double count, double shift, double s1, double s2) {
    if (count == 0) return {};
    const double offset = s1 / count;  // one division: a visible part of a call on short planes
    const double m2 = s2 - s1 * offset;
    return {count, shift, offset, m2 < 0 ? 0.0 : m2};
}

// The moments of many columns (or channels) that share one count, as arrays: the form in which
// per-column work vectorizes. The rows driver keeps one per column, thousands of them on wide
// rows; one Moments at a time, their bookkeeping took half of a training call over a few rows.
struct MomentsColumns {
    double count = 0;
    double* shift = nullptr;
    double* offset = nullptr;
    double* m2 = nullptr;

    Moments at(std::int64_t j) const { return {count, shift[j], offset[j], m2[j]}; }
};

// Columns [0, cols) of m merged with `count` more values per column, given as sums s1, s2 around
// shift[j] (from_shifted_sums, then merge, column by column, with their bits).
template <class Shift>
void merge_shifted_sums(MomentsColumns& m, std::int64_t cols, double count, const Shift* shift, const double* s1,
                        const double* s2) {
    if (count == 0) return;
    if (m.count == 0) {
        for (std::int64_t j = 0; j < cols; ++j) {
            const Moments b = from_shifted_sums(count, double(shift[j]), s1[j], s2[j]);
            m.shift[j] = b.shift;
            m.offset[j] = b.offset;
            m.m2[j] = b.m2;
        }
    } else {
        const double n = m.count + count, a_weight = m.count / n, b_weight = count / n, ab_weight = m.count * count / n;
        for (std::int64_t j = 0; j < cols; ++j) {
            const Moments b = from_shifted_sums(count, double(shift[j]), s1[j], s2[j]);
            const double b_offset = (b.shift - m.shift[j]) + b.offset, delta = b_offset - m.offset[j];
            m.offset[j] = merged_offset(m.offset[j], b_offset, a_weight, b_weight);
            m.m2[j] = m.m2[j] + b.m2 + delta * delta * ab_weight;
        }
    }
    m.count += count;
}

// Columns [0, cols) of b merged into those of a (merge, column by column, with its bits); a's
// count becomes the total.
inline void merge_columns(MomentsColumns& a, const MomentsColumns& b, std::int64_t cols) {
    if (b.count == 0) return;
    if (a.count == 0) {
        std::copy_n(b.shift, cols, a.shift);
        std::copy_n(b.offset, cols, a.offset);
        std::copy_n(b.m2, cols, a.m2);
    } else {
        const double n = a.count + b.count, a_weight = a.count / n, b_weight = b.count / n,
                     ab_weight = a.count * b.count / n;
        for (std::int64_t j = 0; j < cols; ++j) {
            const double b_offset = (b.shift[j] - a.shift[j]) + b.offset[j], delta = b_offset - a.offset[j];
            a.offset[j] = merged_offset(a.offset[j], b_offset, a_weight, b_weight);
            a.m2[j] = a.m2[j] + b.m2[j] + delta * delta * ab_weight;
        }
    }
    a.count += b.count;
}

// A shift only serves accuracy, so any finite value will do. One taken from data holding +inf
// would make every deviation NaN (inf - inf), where sums around zero give the mean torch gives:
// inf (NaN only for data holding NaN or both infinities).
inline double finite_shift(double shift) { return std::isfinite(shift) ? shift : 0.0; }

// Whether sums around `shift` give the variance without losing digits: the correction
// s1^2/n may cancel at most half of s2, i.e. the shift is within one standard deviation of the
// mean. Otherwise the caller sums again around the mean that s1 reveals.
inline bool shift_is_close(double count, double s1, double s2) { return 2 * s1 * s1 <= s2 * count; }

// After sums s1, s2 of `count` values per column around shift[j], columns [0, cols): moves each
// column whose shift was not close to the mean its sums reveal, zeroes its sums and calls
// resum(j0, j1) for runs of such columns, a run taking in close columns less than `gap` apart
// (their sums are zeroed and summed again around their own shift). Only the far columns are
// summed again: with a shift from a few probed values, one column in a few hundred misses by
// chance, and summing every column again for it doubled the statistics of wide inputs
// (256x1024: almost every call).
template <class Shift, class Resum>
void resum_far_columns(std::int64_t cols, std::int64_t gap, double count, Shift* shift, double* s1, double* s2,
                       Resum&& resum) {
    const auto far = [&](std::int64_t j) { return !shift_is_close(count, s1[j], s2[j]); };
    for (std::int64_t j = 0; j < cols;) {
        if (!far(j)) {
            ++j;
            continue;
        }
        std::int64_t end = j + 1;  // one past the run's last far column
        for (std::int64_t i = end; i < cols && i < end + gap; ++i)
            if (far(i)) end = i + 1;
        for (std::int64_t i = j; i < end; ++i) {
            if (far(i)) shift[i] = Shift(finite_shift(double(shift[i]) + s1[i] / count));
            s1[i] = s2[i] = 0;
        }
        resum(j, end);
        j = end;
    }
}

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
