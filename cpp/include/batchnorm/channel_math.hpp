// Per-channel scalars, computed in float64 once per channel: the affine map the kernels apply,
// the running-statistics update and the saved statistics.
#pragma once

#include <cmath>
#include <cstdint>

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

// Channel c's eval factors from given statistics (usually the running ones). The mean is
// already a T, so the shift is the mean itself and nothing moves into beta.
template <class T>
ChannelAffine<T> eval_affine(std::int64_t c, const T* mean, const T* var, const T* weight, const T* bias,
                             double eps) {
    return affine_for<T>(Moments{1, double(mean[c]), 0, 0}, invstd_of(double(var[c]), eps),
                         value_or(weight, c, 1.0), value_or(bias, c, 0.0));
}

// Arguments of a training forward, as the public API documents them.
template <class T>
struct TrainArgs {
    const T* weight;
    const T* bias;
    T* running_mean;
    T* running_var;
    double momentum;
    double eps;
    T* save_mean;
    T* save_invstd;
};

// Writes channel c's running and saved statistics and returns its affine map.
template <class T>
ChannelAffine<T> finish_train_channel(std::int64_t c, const Moments& m, const TrainArgs<T>& a) {
    const double invstd = invstd_of(m.biased_var(), a.eps);
    if (a.running_mean) {
        const double keep = 1.0 - a.momentum;
        a.running_mean[c] = T(keep * double(a.running_mean[c]) + a.momentum * m.mean());
        a.running_var[c] = T(keep * double(a.running_var[c]) + a.momentum * m.unbiased_var());
    }
    if (a.save_mean) a.save_mean[c] = T(m.mean());
    if (a.save_invstd) a.save_invstd[c] = T(invstd);
    return affine_for<T>(m, invstd, value_or(a.weight, c, 1.0), value_or(a.bias, c, 0.0));
}

// Arguments of a backward pass.
template <class T>
struct BackwardArgs {
    const T* mean;
    const T* invstd;
    const T* weight;
    T* grad_weight;
    T* grad_bias;
    bool training;
};

// grad_x = k*dy + (x - mean)*m + q, from DESIGN.md's formula:
// k = w*invstd, m = -w*invstd^3*sum_dy_xmu/n, q = -w*invstd*sum_dy/n (m = q = 0 in eval).
template <class T>
struct GradCoefficients {
    T shift, k, m, q;
};

template <class T>
GradCoefficients<T> finish_backward_channel(std::int64_t c, const Sums& sums, double n,
                                            const BackwardArgs<T>& a) {
    const double invstd = double(a.invstd[c]);
    const double k = value_or(a.weight, c, 1.0) * invstd;
    if (a.grad_weight) a.grad_weight[c] = T(sums.second * invstd);
    if (a.grad_bias) a.grad_bias[c] = T(sums.first);
    if (!a.training) return {a.mean[c], T(k), T(0), T(0)};
    return {a.mean[c], T(k), T(-k * invstd * invstd * sums.second / n), T(-k * sums.first / n)};
}

}  // namespace batchnorm::detail
