// Public per-group statistics and batch norm's phase functions: the seam a distributed batch
// norm is built on. Each process computes its GroupStats (batch_moments), the statistics are
// merged exactly (merge: Chan's formula, float64), every process normalizes from the merged
// statistics (batch_norm_apply); backward the same with float64 sums
// (batch_norm_backward_reduce, then batch_norm_backward_apply with the summed values).
// Only the explicit phases pay a second read of x; the fused calls in norms/ do not.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "engine/engine.hpp"
#include "norms/common.hpp"

namespace batchnorm {

// The statistics of one group of values: count, mean, and M2, the sum of squared deviations
// from the mean, all in float64. Variance = m2/count (biased) or m2/(count - 1) (unbiased).
struct GroupStats {
    double count = 0;
    double mean = 0;
    double m2 = 0;
};

// Chan, Golub & LeVeque: the statistics of the union of two groups.
inline GroupStats merge(const GroupStats& a, const GroupStats& b) {
    const detail::Moments m = detail::merge(detail::Moments{a.count, a.mean, 0, a.m2},
                                            detail::Moments{b.count, b.mean, 0, b.m2});
    return {m.count, m.mean(), m.m2};
}

namespace detail {

// A backward finish step whose result is the sums themselves (no gradient apply follows).
template <class P>
struct SumsOut {
    double* sum_dy;
    double* sum_dy_xmu;

    GradCoefficients<P> operator()(std::int64_t c, const Sums& s) const {
        sum_dy[c] = s.first;
        sum_dy_xmu[c] = s.second;
        return {};
    }
    void channels(std::int64_t c0, std::int64_t n, const double* sdy, const double* sdyx, P*, P*, P*, P*) const {
        std::copy_n(sdy, n, sum_dy + c0);
        std::copy_n(sdyx, n, sum_dy_xmu + c0);
    }
};

}  // namespace detail

// Per-channel statistics of x into stats[0..channels). An empty input gives count 0, mean 0, m2 0.
template <class T>
void batch_moments(const T* x, const Shape& shape, GroupStats* stats) {
    detail::check_element_type<T>();
    detail::check_shape(shape);
    detail::check_channel_pointer(stats, "stats", shape.channels);
    if (shape.size() == 0) {
        std::fill_n(stats, shape.channels, GroupStats{});
        return;
    }
    detail::check_pointer(x, "x");
    detail::segment_moments(x, shape, [&](std::int64_t c, const detail::Moments& m) {
        stats[c] = GroupStats{m.count, m.mean(), m.m2};
    });
}

// y = (x - mean)*invstd*weight + bias per channel, from given statistics (one pass).
// weight null means 1, bias null means 0.
template <class T>
void batch_norm_apply(const T* x, T* y, const Shape& shape, const compute_t<T>* mean, const compute_t<T>* invstd,
                      const compute_t<T>* weight, const compute_t<T>* bias) {
    using P = compute_t<T>;
    detail::check_element_type<T>();
    detail::check_shape(shape);
    detail::check_channel_pointer(mean, "mean", shape.channels);
    detail::check_channel_pointer(invstd, "invstd", shape.channels);
    if (shape.size() == 0) return;
    detail::check_pointer(x, "x");
    detail::check_pointer(y, "y");
    std::vector<P> factors(2 * std::size_t(shape.channels));
    P *alpha = factors.data(), *beta = alpha + shape.channels;
    for (std::int64_t c = 0; c < shape.channels; ++c) {
        const auto a = detail::given_affine<P>(mean[c], double(invstd[c]), detail::value_or(weight, c, 1.0),
                                               detail::value_or(bias, c, 0.0));
        alpha[c] = a.alpha;
        beta[c] = a.beta;
    }
    detail::apply_affine(x, static_cast<const T*>(nullptr), y, shape, mean, alpha, beta, Activation::none);
}

// Per channel: sum_dy = sum(grad_y), sum_dy_xmu = sum(grad_y*(x - mean)), in float64.
template <class T>
void batch_norm_backward_reduce(const T* grad_y, const T* x, const Shape& shape, const compute_t<T>* mean, double* sum_dy,
                                double* sum_dy_xmu) {
    detail::check_element_type<T>();
    detail::check_shape(shape);
    detail::check_channel_pointer(mean, "mean", shape.channels);
    detail::check_channel_pointer(sum_dy, "sum_dy", shape.channels);
    detail::check_channel_pointer(sum_dy_xmu, "sum_dy_xmu", shape.channels);
    if (shape.size() == 0) {
        std::fill_n(sum_dy, shape.channels, 0.0);
        std::fill_n(sum_dy_xmu, shape.channels, 0.0);
        return;
    }
    detail::check_pointer(grad_y, "grad_y");
    detail::check_pointer(x, "x");
    detail::backward_fused(grad_y, x, static_cast<T*>(nullptr), shape, mean,
                           detail::SumsOut<compute_t<T>>{sum_dy, sum_dy_xmu});
}

// grad_x = weight*invstd*(grad_y - sum_dy/count - (x - mean)*invstd^2*sum_dy_xmu/count), from
// sums (and the count of values per channel) gathered over every participant.
template <class T>
void batch_norm_backward_apply(const T* grad_y, const T* x, T* grad_x, const Shape& shape, const compute_t<T>* mean,
                               const compute_t<T>* invstd, const compute_t<T>* weight, const double* sum_dy,
                               const double* sum_dy_xmu, double count) {
    using P = compute_t<T>;
    detail::check_element_type<T>();
    detail::check_shape(shape);
    detail::check_channel_pointer(mean, "mean", shape.channels);
    detail::check_channel_pointer(invstd, "invstd", shape.channels);
    detail::check_channel_pointer(sum_dy, "sum_dy", shape.channels);
    detail::check_channel_pointer(sum_dy_xmu, "sum_dy_xmu", shape.channels);
    detail::require(count > 0, "count must be positive, got ", count);
    if (shape.size() == 0) return;
    detail::check_pointer(grad_y, "grad_y");
    detail::check_pointer(x, "x");
    detail::check_pointer(grad_x, "grad_x");
    std::vector<detail::GradCoefficients<P>> coef(std::size_t(shape.channels));
    const double inv_count = 1.0 / count;
    for (std::int64_t c = 0; c < shape.channels; ++c) {
        const double is = double(invstd[c]), w = detail::value_or(weight, c, 1.0);
        const auto [m, q] = detail::through_statistics(is, w * sum_dy[c], w * sum_dy_xmu[c], inv_count);
        coef[std::size_t(c)] = {mean[c], P(w * is), P(m), P(q)};
    }
    detail::apply_grad(grad_y, x, grad_x, shape, coef.data());
}

}  // namespace batchnorm
