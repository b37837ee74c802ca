// The C++ API: batch normalization over raw pointers to contiguous memory seen as
// (outer, channels, inner) -- see shape.hpp. T is float or double, deduced from the first array
// argument alone, so a null optional pointer needs no <T>. Per-channel arrays hold
// `channels` values. Optional pointers may be null. Outputs may alias their input (in place).
// Invalid arguments throw batchnorm::invalid_argument (a std::invalid_argument) before anything
// is written.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "channel_math.hpp"
#include "channels_first.hpp"
#include "channels_last.hpp"
#include "dispatch.hpp"
#include "errors.hpp"
#include "shape.hpp"

namespace batchnorm {

enum class Activation { none, relu };

namespace detail {

template <class T>
void check_element_type() {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                  "batchnorm supports float and double");
}

inline void check_eps(double eps) {
    require(std::isfinite(eps) && eps > 0, "eps must be a positive finite number, got ", eps);
}

inline void check_pointer(const void* p, const char* name) {
    require(p != nullptr, name, " must not be null");
}

inline void check_training_size(const Shape& s) {
    require(s.per_channel() != 1, "Expected more than 1 value per channel when training, got input size (",
            s.outer, ", ", s.channels, ", ", s.inner, ")");
}

}  // namespace detail

// Per-channel mean and biased variance of x.
template <class T>
void batch_stats(const T* x, const Shape& shape, detail::identity_t<T>* mean, detail::identity_t<T>* var) {
    detail::check_element_type<T>();
    detail::check_shape(shape);
    detail::check_pointer(mean, "mean");
    detail::check_pointer(var, "var");
    if (shape.size() == 0) {  // no values: NaN statistics for every channel there is
        std::fill_n(mean, shape.channels, std::numeric_limits<T>::quiet_NaN());
        std::fill_n(var, shape.channels, std::numeric_limits<T>::quiet_NaN());
        return;
    }
    detail::check_pointer(x, "x");
    const auto& k = detail::kernels<T>();
    if (detail::reads_as_rows<T>(shape)) detail::stats_channels_last(k, x, shape, mean, var);
    else detail::stats_channels_first(k, x, shape, mean, var);
}

// Training forward: y = (x - mean) / sqrt(var + eps) * weight + bias with the batch's mean and
// biased variance. When running_mean and running_var are given (both or neither), they become
// (1 - momentum) * running + momentum * batch, with the unbiased variance. save_mean and
// save_invstd (optional) receive the batch mean and 1/sqrt(var + eps) for backward.
// weight null means 1, bias null means 0. Needs more than one value per channel; an empty
// input writes NaN to save_mean/save_invstd and touches nothing else.
template <class T>
void forward_train(const T* x, detail::identity_t<T>* y, const Shape& shape, const detail::identity_t<T>* weight,
                   const detail::identity_t<T>* bias, detail::identity_t<T>* running_mean, detail::identity_t<T>* running_var,
                   double momentum, double eps, detail::identity_t<T>* save_mean = nullptr,
                   detail::identity_t<T>* save_invstd = nullptr) {
    detail::check_element_type<T>();
    detail::check_shape(shape);
    detail::check_eps(eps);
    detail::require(momentum >= 0 && momentum <= 1, "momentum must be in [0, 1], got ", momentum);
    detail::require((running_mean == nullptr) == (running_var == nullptr),
                    "running_mean and running_var must be given together");
    detail::check_training_size(shape);
    if (shape.size() == 0) {
        if (save_mean) std::fill_n(save_mean, shape.channels, std::numeric_limits<T>::quiet_NaN());
        if (save_invstd) std::fill_n(save_invstd, shape.channels, std::numeric_limits<T>::quiet_NaN());
        return;
    }
    detail::check_pointer(x, "x");
    detail::check_pointer(y, "y");
    const detail::TrainArgs<T> args{weight, bias, running_mean, running_var, momentum, eps, save_mean, save_invstd};
    const auto& k = detail::kernels<T>();
    if (detail::reads_as_rows<T>(shape)) detail::train_channels_last(k, x, y, shape, args);
    else detail::train_channels_first(k, x, y, shape, args);
}

namespace detail {

// Applies per-channel (shift, alpha, beta) in one pass: y = act((x - shift)*alpha + beta + residual).
template <class T>
void apply_affine(const T* x, const T* residual, T* y, const Shape& shape, const T* shift,
                  const T* alpha, const T* beta, Activation act) {
    const auto& k = kernels<T>();
    const bool relu = act == Activation::relu;
    if (!reads_as_rows<T>(shape)) {
        eval_channels_first(k, x, residual, y, shape, shift, alpha, beta, relu);
    } else if (shape.inner == 1) {
        eval_channels_last(k, x, residual, y, shape, shift, alpha, beta, relu);
    } else {
        // Small planes, read as rows of C*inner columns: each factor repeated over its channel's
        // columns, in a buffer this thread keeps.
        thread_local std::vector<T> columns;
        const std::int64_t cols = shape.channels * shape.inner;
        columns.resize(3 * std::size_t(cols));
        T *s = columns.data(), *a = s + cols, *b = a + cols;
        for (std::int64_t c = 0; c < shape.channels; ++c) {
            std::fill_n(s + c * shape.inner, shape.inner, shift[c]);
            std::fill_n(a + c * shape.inner, shape.inner, alpha[c]);
            std::fill_n(b + c * shape.inner, shape.inner, beta[c]);
        }
        eval_channels_last(k, x, residual, y, Shape{shape.outer, cols, 1}, s, a, b, relu);
    }
}

}  // namespace detail

// Eval forward from given statistics (usually the running ones), in one pass:
// y = act((x - mean) / sqrt(var + eps) * weight + bias + residual). residual (same shape as x)
// may be null; act is none or relu.
template <class T>
void forward_eval(const T* x, detail::identity_t<T>* y, const Shape& shape, const detail::identity_t<T>* mean,
                  const detail::identity_t<T>* var, const detail::identity_t<T>* weight, const detail::identity_t<T>* bias, double eps,
                  const detail::identity_t<T>* residual = nullptr, Activation act = Activation::none) {
    detail::check_element_type<T>();
    detail::check_shape(shape);
    detail::check_eps(eps);
    detail::check_pointer(mean, "mean");
    detail::check_pointer(var, "var");
    if (shape.size() == 0) return;
    detail::check_pointer(x, "x");
    detail::check_pointer(y, "y");
    // Per-channel factors in a buffer this thread keeps: no allocation per call once warm.
    thread_local std::vector<T> factors;
    factors.resize(2 * std::size_t(shape.channels));
    T* alpha = factors.data();
    T* beta = alpha + shape.channels;
    for (std::int64_t c = 0; c < shape.channels; ++c) {
        const detail::ChannelAffine<T> a = detail::eval_affine(c, mean, var, weight, bias, eps);
        alpha[c] = a.alpha;
        beta[c] = a.beta;
    }
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
void backward(const T* grad_y, const detail::identity_t<T>* x, detail::identity_t<T>* grad_x, const Shape& shape,
              const detail::identity_t<T>* mean, const detail::identity_t<T>* invstd, const detail::identity_t<T>* weight,
              detail::identity_t<T>* grad_weight, detail::identity_t<T>* grad_bias, bool training = true) {
    detail::check_element_type<T>();
    detail::check_shape(shape);
    detail::check_pointer(mean, "mean");
    detail::check_pointer(invstd, "invstd");
    if (shape.size() == 0) {
        if (grad_weight) std::fill_n(grad_weight, shape.channels, T(0));
        if (grad_bias) std::fill_n(grad_bias, shape.channels, T(0));
        return;
    }
    detail::check_pointer(grad_y, "grad_y");
    detail::check_pointer(x, "x");
    const detail::BackwardArgs<T> args{mean, invstd, weight, grad_weight, grad_bias, training};
    const auto& k = detail::kernels<T>();
    if (detail::reads_as_rows<T>(shape)) detail::backward_channels_last(k, grad_y, x, grad_x, shape, args);
    else detail::backward_channels_first(k, grad_y, x, grad_x, shape, args);
}

}  // namespace batchnorm
