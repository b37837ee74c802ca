// Batch normalization: statistics per channel over (outer, inner), PyTorch's BatchNorm
// semantics. Its finish steps (training: saved and running statistics, affine factors;
// backward: gradient coefficients) and the functional API over raw pointers (see
// functional.hpp for the conventions).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "../engine/engine.hpp"
#include "common.hpp"
#include "running_stats.hpp"

namespace batchnorm {
namespace detail {

inline void check_training_size(const Shape& s) {
    require(s.per_channel() != 1, "Expected more than 1 value per channel when training, got input size (",
            s.outer, ", ", s.channels, ", ", s.inner, ")");
}

// Arguments of a training forward, as the public API documents them. momentum is the factor
// of the running-statistics rule (running_factor). inv_n and inv_n1 are 1/n and 1/(n - 1) for
// the n values of every channel: the variances by multiplication, two divisions fewer per
// channel (on short planes the per-channel scalars are a third of the call).
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
    double inv_n;
    double inv_n1;
};

// Writes channel c's running and saved statistics and returns its affine map.
template <class T>
ChannelAffine<T> finish_train_channel(std::int64_t c, const Moments& m, const TrainArgs<T>& a) {
    const double invstd = invstd_of(m.m2 * a.inv_n, a.eps);
    if (a.running_mean) update_running(a.running_mean[c], a.running_var[c], m.mean(), m.m2 * a.inv_n1, a.momentum);
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
GradCoefficients<T> finish_backward_channel(std::int64_t c, const Sums& sums, double inv_n,
                                            const BackwardArgs<T>& a) {
    const double invstd = double(a.invstd[c]);
    const double w = value_or(a.weight, c, 1.0);
    if (a.grad_weight) a.grad_weight[c] = T(sums.second * invstd);
    if (a.grad_bias) a.grad_bias[c] = T(sums.first);
    if (!a.training) return {a.mean[c], T(w * invstd), T(0), T(0)};
    const auto [m, q] = through_statistics(invstd, w * sums.first, w * sums.second, inv_n);
    return {a.mean[c], T(w * invstd), T(m), T(q)};
}

}  // namespace detail

// Per-channel mean and biased variance of x. T is the storage type of x (and y, residual,
// gradients): float, double, float16 or bfloat16; per-channel arrays (weight, bias, statistics)
// are compute_t<T>: float for the half types.
template <class T>
void batch_stats(const T* x, const Shape& shape, compute_t<T>* mean, compute_t<T>* var) {
    using P = compute_t<T>;
    detail::check_element_type<T>();
    detail::check_shape(shape);
    detail::check_pointer(mean, "mean");
    detail::check_pointer(var, "var");
    if (shape.size() == 0) {  // no values: NaN statistics for every channel there is
        std::fill_n(mean, shape.channels, std::numeric_limits<P>::quiet_NaN());
        std::fill_n(var, shape.channels, std::numeric_limits<P>::quiet_NaN());
        return;
    }
    detail::check_pointer(x, "x");
    detail::segment_moments(x, shape, [&](std::int64_t c, const detail::Moments& m) {
        mean[c] = P(m.mean());
        var[c] = P(m.biased_var());
    });
}

// Training forward: y = (x - mean) / sqrt(var + eps) * weight + bias with the batch's mean and
// biased variance. When running_mean and running_var are given (both or neither), they become
// (1 - momentum) * running + momentum * batch, with the unbiased variance. save_mean and
// save_invstd (optional) receive the batch mean and 1/sqrt(var + eps) for backward.
// act relu: y = relu(...) in the same pass (the fused BN + ReLU of a graph compiler; backward
// then takes the gradient through the ReLU, dy * (y > 0), as its dy).
// weight null means 1, bias null means 0. Needs more than one value per channel; an empty
// input writes NaN to save_mean/save_invstd and touches nothing else.
template <class T>
void forward_train(const T* x, T* y, const Shape& shape, const compute_t<T>* weight, const compute_t<T>* bias,
                   compute_t<T>* running_mean, compute_t<T>* running_var, double momentum, double eps,
                   compute_t<T>* save_mean = nullptr, compute_t<T>* save_invstd = nullptr,
                   Activation act = Activation::none) {
    using P = compute_t<T>;
    detail::check_element_type<T>();
    detail::check_shape(shape);
    detail::check_eps(eps);
    detail::check_momentum(momentum);
    detail::require((running_mean == nullptr) == (running_var == nullptr),
                    "running_mean and running_var must be given together");
    detail::check_training_size(shape);
    if (shape.size() == 0) {
        if (save_mean) std::fill_n(save_mean, shape.channels, std::numeric_limits<P>::quiet_NaN());
        if (save_invstd) std::fill_n(save_invstd, shape.channels, std::numeric_limits<P>::quiet_NaN());
        return;
    }
    detail::check_pointer(x, "x");
    detail::check_pointer(y, "y");
    const double n = double(shape.per_channel());
    const detail::TrainArgs<P> args{weight, bias, running_mean, running_var, momentum, eps,
                                    save_mean, save_invstd, 1.0 / n, 1.0 / (n - 1)};
    detail::normalize_fused(x, y, shape, act, [&](std::int64_t c, const detail::Moments& m) {
        return detail::finish_train_channel(c, m, args);
    });
}


// Eval forward from given statistics (usually the running ones), in one pass:
// y = act((x - mean) / sqrt(var + eps) * weight + bias + residual). residual (same shape as x)
// may be null; act is none or relu.
template <class T>
void forward_eval(const T* x, T* y, const Shape& shape, const compute_t<T>* mean, const compute_t<T>* var,
                  const compute_t<T>* weight, const compute_t<T>* bias, double eps,
                  const detail::identity_t<T>* residual = nullptr, Activation act = Activation::none) {
    using P = compute_t<T>;
    detail::check_element_type<T>();
    detail::check_shape(shape);
    detail::check_eps(eps);
    detail::check_pointer(mean, "mean");
    detail::check_pointer(var, "var");
    if (shape.size() == 0) return;
    detail::check_pointer(x, "x");
    detail::check_pointer(y, "y");
    // Per-channel factors in a buffer this thread keeps: no allocation per call once warm.
    thread_local std::vector<P> factors;
    factors.resize(2 * std::size_t(shape.channels));
    P* alpha = factors.data();
    P* beta = alpha + shape.channels;
    detail::kernels<T>().eval_factors(var, weight, bias, shape.channels, eps, alpha, beta);
    detail::apply_affine(x, residual, y, shape, mean, alpha, beta, act);
}

// Backward. With training = true, the gradient through the batch statistics (mean, invstd as
// saved by forward_train):
//   grad_x = weight*invstd*(dy - sum(dy)/n - (x - mean)*invstd^2*sum(dy*(x - mean))/n).
// With training = false (running statistics used, invstd = 1/sqrt(running_var + eps)):
//   grad_x = dy*weight*invstd.
// Always grad_weight = sum(dy*(x - mean))*invstd and grad_bias = sum(dy) per channel.
// grad_x, grad_weight, grad_bias may each be null (not wanted); weight null means 1.
template <class T>
void backward(const T* grad_y, const T* x, detail::identity_t<T>* grad_x, const Shape& shape, const compute_t<T>* mean,
              const compute_t<T>* invstd, const compute_t<T>* weight, compute_t<T>* grad_weight,
              compute_t<T>* grad_bias, bool training = true) {
    using P = compute_t<T>;
    detail::check_element_type<T>();
    detail::check_shape(shape);
    detail::check_pointer(mean, "mean");
    detail::check_pointer(invstd, "invstd");
    if (shape.size() == 0) {
        if (grad_weight) std::fill_n(grad_weight, shape.channels, P(0));
        if (grad_bias) std::fill_n(grad_bias, shape.channels, P(0));
        return;
    }
    detail::check_pointer(grad_y, "grad_y");
    detail::check_pointer(x, "x");
    const detail::BackwardArgs<P> args{mean, invstd, weight, grad_weight, grad_bias, training};
    const double inv_n = 1.0 / double(shape.per_channel());
    detail::backward_fused(grad_y, x, grad_x, shape, mean, [&](std::int64_t c, const detail::Sums& sums) {
        return detail::finish_backward_channel(c, sums, inv_n, args);
    });
}

}  // namespace batchnorm
