// Per-segment scalars, computed in float64 once per segment: the affine map the apply pass uses
// and the gradient coefficients of a backward apply. No norm semantics: each norm's finish step
// (norms/) decides which statistics and parameters go in.
#pragma once

#include <cmath>
#include <cstdint>
#include <utility>

#include "moments.hpp"

namespace batchnorm::detail {

// y = (x - shift) * alpha + beta. shift is the mean rounded to T; the rounding error moves
// into beta, so x - shift stays exact for data far from zero and no digits cancel.
template <class T>
struct ChannelAffine {
    T shift, alpha, beta;
};

template <class T>
ChannelAffine<T> affine_for(const Moments& m, double invstd, double weight, double bias) {
    const T shift = T(m.mean());
    const double alpha = weight * invstd;
    // mean - shift, without first rounding the mean: (m.shift - shift) is exact when close.
    const double rest = (m.shift - double(shift)) + m.offset;
    return {shift, T(alpha), T(bias - rest * alpha)};
}

inline double invstd_of(double var, double eps) { return 1.0 / std::sqrt(var + eps); }

template <class T>
double value_or(const T* values, std::int64_t c, double fallback) {
    return values ? double(values[c]) : fallback;
}

// Factors from given statistics (a mean already of type T, so nothing moves into beta).
template <class T>
ChannelAffine<T> given_affine(T mean, double invstd, double weight, double bias) {
    return affine_for<T>(Moments{1, double(mean), 0, 0}, invstd, weight, bias);
}

// grad_x = k*dy + (x - shift)*m + q: every normalization's input gradient has this form once
// its reductions are known (see each norm's finish step).
template <class T>
struct GradCoefficients {
    T shift, k, m, q;
};

// The gradient through a normalization's own statistics, for a segment of n values normalized
// as (x - mean)*invstd*w: with a = sum(dy*w) and b = sum(dy*w*(x - mean)) over the segment,
// grad_x = w*invstd*dy - invstd*a/n - (x - mean)*invstd^3*b/n. Returns (m, q). Takes 1/n: a
// division per segment is a visible part of a small call.
inline std::pair<double, double> through_statistics(double invstd, double a, double b, double inv_n) {
    const double t = invstd * inv_n;
    return {-t * invstd * invstd * b, -t * a};
}

}  // namespace batchnorm::detail
