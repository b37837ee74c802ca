// Batch normalization: statistics per channel over (outer, inner), PyTorch's BatchNorm
// semantics. Its finish steps (training: saved and running statistics, affine factors;
// backward: gradient coefficients) and the functional API over raw pointers (see
// functional.hpp for the conventions).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "../engine/call_scratch.hpp"
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

// The training forward's finish step, for one channel (the channels-first driver: channels
// finish one by one as their reductions end) or for a range of them (the rows driver: thousands
// of channels of a few rows each, where one channel at a time was a third of the call on a
// (32, 2048) input). The range form is finish_train_channel written as loops over arrays, which
// vectorize, square roots and divisions included (invstd_in_place, a kernel), with its bits.
// (A range of one in place of finish_train_channel cost 10 % of a 8x512x7x7 training call.)
template <class T>
struct TrainFinish {
    TrainArgs<T> args;
    void (*invstd_in_place)(double* v, std::int64_t n, double eps);

    ChannelAffine<T> operator()(std::int64_t c, const Moments& m) const { return finish_train_channel(c, m, args); }

    // Channels [c0, c0 + n), moments m (indexed from 0), affine maps into shift, alpha, beta.
    void channels(std::int64_t c0, std::int64_t n, const MomentsColumns& m, T* shift, T* alpha, T* beta) const {
        constexpr std::int64_t kChunk = 256;  // channels per pass, their scalars on the stack
        const TrainArgs<T>& a = args;
        double invstd[kChunk], mean[kChunk];
        for (std::int64_t i0 = 0; i0 < n; i0 += kChunk) {
            const std::int64_t len = std::min(kChunk, n - i0), c = c0 + i0;
            const double *m_shift = m.shift + i0, *m_offset = m.offset + i0, *m2 = m.m2 + i0;
            for (std::int64_t i = 0; i < len; ++i) {
                invstd[i] = m2[i] * a.inv_n;
                mean[i] = m_shift[i] + m_offset[i];
            }
            invstd_in_place(invstd, len, a.eps);
            if (a.running_mean)
                for (std::int64_t i = 0; i < len; ++i)
                    update_running(a.running_mean[c + i], a.running_var[c + i], mean[i], m2[i] * a.inv_n1, a.momentum);
            if (a.save_mean)
                for (std::int64_t i = 0; i < len; ++i) a.save_mean[c + i] = T(mean[i]);
            if (a.save_invstd)
                for (std::int64_t i = 0; i < len; ++i) a.save_invstd[c + i] = T(invstd[i]);
            for (std::int64_t i = 0; i < len; ++i) {
                const ChannelAffine<T> f = affine_for<T>(Moments{m.count, m_shift[i], m_offset[i], m2[i]}, invstd[i],
                                                         value_or(a.weight, c + i, 1.0), value_or(a.bias, c + i, 0.0));
                shift[i0 + i] = f.shift;
                alpha[i0 + i] = f.alpha;
                beta[i0 + i] = f.beta;
            }
        }
    }
};

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
// k = w*invstd, m = -w*invstd^3*sum_dy_xmu/n, q = -w*invstd*sum_dy/n (m = q = 0 in eval); also
// grad_weight and grad_bias. Written for a range of channels as loops over arrays, which
// vectorize: the rows driver finishes thousands of channels at once (a (32, 2048) input: one
// channel at a time, this was a fifth of the call); the channels-first driver, one at a time.
template <class T>
struct BackwardFinish {
    BackwardArgs<T> args;
    double inv_n;

    GradCoefficients<T> operator()(std::int64_t c, const Sums& sums) const {
        GradCoefficients<T> g;
        channels(c, 1, &sums.first, &sums.second, &g.shift, &g.k, &g.m, &g.q);
        return g;
    }

    // Channels [c0, c0 + n), sums sdy and sdyx (indexed from 0), coefficients into shift, k, m, q.
    void channels(std::int64_t c0, std::int64_t n, const double* sdy, const double* sdyx, T* shift, T* k, T* m,
                  T* q) const {
        const BackwardArgs<T>& a = args;
        const T* invstd = a.invstd + c0;
        if (a.grad_weight)
            for (std::int64_t i = 0; i < n; ++i) a.grad_weight[c0 + i] = T(sdyx[i] * double(invstd[i]));
        if (a.grad_bias)
            for (std::int64_t i = 0; i < n; ++i) a.grad_bias[c0 + i] = T(sdy[i]);
        for (std::int64_t i = 0; i < n; ++i) {
            const double w = value_or(a.weight, c0 + i, 1.0), is = double(invstd[i]);
            shift[i] = a.mean[c0 + i];
            k[i] = T(w * is);
            if (a.training) {
                const auto [mi, qi] = through_statistics(is, w * sdy[i], w * sdyx[i], inv_n);
                m[i] = T(mi);
                q[i] = T(qi);
            } else {
                m[i] = q[i] = T(0);
            }
        }
    }
};

}  // namespace detail

// Per-channel mean and biased variance of x. T is the storage type of x (and y, residual,
// gradients): float, double, float16 or bfloat16; per-channel arrays (weight, bias, statistics)
// are compute_t<T>: float for the half types.
template <class T>
void batch_stats(const T* x, const Shape& shape, compute_t<T>* mean, compute_t<T>* var) {
    using P = compute_t<T>;
    detail::check_element_type<T>();
    detail::check_shape(shape);
    detail::check_channel_pointer(mean, "mean", shape.channels);
    detail::check_channel_pointer(var, "var", shape.channels);
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
    detail::normalize_fused(x, y, shape, act, detail::TrainFinish<P>{args, detail::kernels<T>().invstd});
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
    detail::check_channel_pointer(mean, "mean", shape.channels);
    detail::check_channel_pointer(var, "var", shape.channels);
    if (shape.size() == 0) return;
    detail::check_pointer(x, "x");
    detail::check_pointer(y, "y");
    detail::CallScratch<P, struct EvalFactors> factors(2 * std::size_t(shape.channels));
    P* alpha = factors.data();
    P* beta = alpha + shape.channels;
    detail::kernels<T>().eval_factors(var, weight, bias, shape.channels, eps, alpha, beta);
    detail::apply_affine(x, residual, y, shape, mean, alpha, beta, act);
}

// The invstd an eval forward normalizes with, 1/sqrt(var + eps) per channel (computed in
// float64, rounded once): what backward takes as invstd with training = false. In vector lanes,
// a chunk of channels at a time: one channel after another, the square roots and divisions
// were a third of a module's eval of a 1x64x7x7 input. invstd may be var (in place).
template <class P>
void eval_invstd(const P* var, P* invstd, std::int64_t channels, double eps) {
    static_assert(std::is_same_v<P, float> || std::is_same_v<P, double>, "var is float or double");
    detail::check_eps(eps);
    detail::require(channels >= 0, "channels must be >= 0, got ", channels);
    if (channels == 0) return;
    detail::check_pointer(var, "var");
    detail::check_pointer(invstd, "invstd");
    constexpr std::int64_t kChunk = 256;  // channels per pass, in float64 on the stack
    double v[kChunk];
    const auto in_lanes = detail::kernels<P>().invstd;
    for (std::int64_t c0 = 0; c0 < channels; c0 += kChunk) {
        const std::int64_t len = std::min(kChunk, channels - c0);
        for (std::int64_t i = 0; i < len; ++i) v[i] = double(var[c0 + i]);
        in_lanes(v, len, eps);
        for (std::int64_t i = 0; i < len; ++i) invstd[c0 + i] = P(v[i]);
    }
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
    detail::check_channel_pointer(mean, "mean", shape.channels);
    detail::check_channel_pointer(invstd, "invstd", shape.channels);
    if (shape.size() == 0) {
        if (grad_weight) std::fill_n(grad_weight, shape.channels, P(0));
        if (grad_bias) std::fill_n(grad_bias, shape.channels, P(0));
        return;
    }
    detail::check_pointer(grad_y, "grad_y");
    detail::check_pointer(x, "x");
    const detail::BackwardArgs<P> args{mean, invstd, weight, grad_weight, grad_bias, training};
    const double inv_n = 1.0 / double(shape.per_channel());
    if (training) return detail::backward_fused(grad_y, x, grad_x, shape, mean, detail::BackwardFinish<P>{args, inv_n});
    // In eval grad_x does not depend on x: it is grad_y through the affine map (grad_y - 0)*k + 0,
    // which reads neither x (an x of NaN or inf made the fused formula's (x - mean)*0 NaN there;
    // torch's gradient is finite) nor, when no parameter gradient is wanted (a frozen batch
    // norm), anything but grad_y. k = weight*invstd, rounded once, as the fused formula's.
    if (grad_weight || grad_bias)
        detail::backward_fused(grad_y, x, static_cast<T*>(nullptr), shape, mean, detail::BackwardFinish<P>{args, inv_n});
    if (!grad_x) return;
    detail::CallScratch<P, struct EvalGradient> factors(2 * std::size_t(shape.channels));
    P* zeros = factors.data();
    P* k = zeros + shape.channels;
    std::fill_n(zeros, shape.channels, P(0));
    for (std::int64_t c = 0; c < shape.channels; ++c) k[c] = P(detail::value_or(weight, c, 1.0) * double(invstd[c]));
    detail::apply_affine(grad_y, static_cast<const T*>(nullptr), grad_x, shape, zeros, k, zeros, Activation::none);
}

}  // namespace batchnorm
