// batchnorm::BatchNorm<T>: a stateful batch-norm layer with the semantics of the Python class
// batchnorm.BatchNorm1d/2d/3d (and of torch.nn.BatchNorm*d).
//
//   batchnorm::BatchNorm<float> bn(64);                  // eps 1e-5, momentum 0.1, affine, tracked
//   bn.forward(x, y, batchnorm::Shape{N, 64, H * W});     // training: batch statistics
//   bn.backward(grad_y, x, grad_x, shape);               // sets bn.weight_grad, bn.bias_grad
//   bn.eval();
//   bn.forward(x, y, shape);                             // running statistics
//
// State is public, like the Python attributes: weight, bias (channels values each, empty when
// affine = false), running_mean, running_var (empty when track_running_stats = false),
// num_batches_tracked. Callers may change the values; forward() and backward() check the sizes.
//
// forward() in training mode, or in eval mode without running statistics, normalizes with the
// batch's statistics; in training mode with track_running_stats it also updates the running
// statistics, with factor momentum, or with 1/num_batches_tracked (after counting this batch,
// a cumulative average) when momentum is std::nullopt, and adds 1 to num_batches_tracked.
// An empty batch (outer or inner 0) writes nothing and changes no state: unlike PyTorch it is
// not counted. In eval mode with running statistics, forward() normalizes with them.
//
// backward() uses the input x of the last forward (passed again by the caller, unchanged) and
// the statistics that forward saved: the batch mean and 1/sqrt(var + eps) after a batch-stat
// forward (gradient through the statistics), the running mean and 1/sqrt(running_var + eps) as
// they were at the forward otherwise (grad_x = grad_y*weight*invstd). It uses the current weight.
//
// Errors throw batchnorm::invalid_argument before anything is written: no output, running
// statistic or counter changes on a failed call.
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "errors.hpp"
#include "functional.hpp"
#include "inference.hpp"
#include "shape.hpp"

namespace batchnorm {

template <class T>
class BatchNorm {
public:
    using P = compute_t<T>;  // parameters and statistics: float for the half storage types

    // PyTorch's constructor: BatchNorm2d(num_features, eps=1e-5, momentum=0.1, affine=True,
    // track_running_stats=True). momentum std::nullopt is PyTorch's momentum=None.
    explicit BatchNorm(std::int64_t num_features, double eps = 1e-5,
                       std::optional<double> momentum = 0.1, bool affine = true,
                       bool track_running_stats = true)
        : num_features_(num_features), eps_(eps), momentum_(momentum), affine_(affine),
          track_running_stats_(track_running_stats) {
        detail::check_element_type<T>();
        detail::require(num_features > 0, "num_features must be > 0, got ", num_features);
        detail::check_count("num_features", num_features);
        detail::check_eps(eps);
        detail::require(!momentum || (*momentum >= 0 && *momentum <= 1),
                        "momentum must be nullopt or in [0, 1], got ", momentum ? *momentum : 0.0);
        reset_parameters();
    }

    // ---- state, public like the Python attributes ------------------------------------------
    std::vector<P> weight, bias;               // channels values each; empty when !affine()
    std::vector<P> running_mean, running_var;  // channels values each; empty when !track_running_stats()
    std::int64_t num_batches_tracked = 0;      // batches seen in training (0 when not tracking)
    std::vector<P> weight_grad, bias_grad;     // set by backward(); empty when !affine()

    // ---- configuration -----------------------------------------------------------------------
    std::int64_t num_features() const { return num_features_; }
    double eps() const { return eps_; }
    std::optional<double> momentum() const { return momentum_; }
    bool affine() const { return affine_; }
    bool track_running_stats() const { return track_running_stats_; }

    bool training() const { return training_; }
    BatchNorm& train(bool mode = true) {
        training_ = mode;
        return *this;
    }
    BatchNorm& eval() { return train(false); }

    // running_mean = 0, running_var = 1, num_batches_tracked = 0 (when tracking).
    void reset_running_stats() {
        const std::size_t n = std::size_t(num_features_);
        running_mean.assign(track_running_stats_ ? n : 0, P(0));
        running_var.assign(track_running_stats_ ? n : 0, P(1));
        num_batches_tracked = 0;
    }

    // The running statistics reset, weight = 1 and bias = 0 (when affine).
    void reset_parameters() {
        reset_running_stats();
        const std::size_t n = std::size_t(num_features_);
        weight.assign(affine_ ? n : 0, P(1));
        bias.assign(affine_ ? n : 0, P(0));
    }

    // Normalizes x of the given shape (shape.channels == num_features()) into y; y may be x (in
    // place, after which backward() is impossible). residual and act are the inference fusion
    // y = act(bn(x) + residual), allowed only when the running statistics are used (eval mode,
    // tracked); no backward() after a fused forward.
    void forward(const T* x, T* y, const Shape& shape, const T* residual = nullptr,
                 Activation act = Activation::none) {
        check_state();
        detail::check_shape(shape);
        check_channels(shape);
        const std::size_t n = std::size_t(num_features_);
        if (use_batch_stats()) {
            detail::require(residual == nullptr,
                            "residual is only supported in eval mode with running statistics");
            detail::require(act == Activation::none,
                            "activation is only supported in eval mode with running statistics");
            const bool counting = training_ && track_running_stats_;
            double factor = 0.0;
            if (counting) factor = running_factor(momentum_, num_batches_tracked + 1);
            P* rm = counting ? running_mean.data() : nullptr;
            P* rv = counting ? running_var.data() : nullptr;
            std::vector<P> mean(n), invstd(n);
            forward_train(x, y, shape, param(weight), param(bias), rm, rv, factor, eps_, mean.data(),
                          invstd.data());
            // Only after forward_train succeeded; an empty batch is not counted.
            if (counting && shape.size() > 0) ++num_batches_tracked;
            save(shape, std::move(mean), std::move(invstd), true, x, y, nullptr);
        } else {
            forward_eval(x, y, shape, running_mean.data(), running_var.data(), param(weight),
                         param(bias), eps_, residual, act);
            std::vector<P> invstd(n);
            eval_invstd(running_var.data(), invstd.data(), std::int64_t(n), eps_);
            const bool fused = residual != nullptr || act != Activation::none;
            save(shape, running_mean, std::move(invstd), false, x, y,
                 fused ? "backward is not available after a forward with residual or activation" : nullptr);
        }
    }

    // Gradient of the last forward: writes grad_x (may be null: not wanted) and sets weight_grad
    // and bias_grad (when affine). x must be the input of the last forward, unchanged; shape its
    // shape. Throws invalid_argument before any forward, after an in-place or fused forward, and
    // for a shape other than the last forward's.
    void backward(const T* grad_y, const T* x, T* grad_x, const Shape& shape) {
        detail::require(saved_.has_value(), "backward needs a forward first: call forward on an input");
        detail::require(saved_->why_not == nullptr, saved_->why_not ? saved_->why_not : "");
        detail::check_shape(shape);
        const Shape& s = saved_->shape;
        detail::require(shape.outer == s.outer && shape.channels == s.channels && shape.inner == s.inner,
                        "backward: shape (", shape.outer, ", ", shape.channels, ", ", shape.inner,
                        ") is not the shape of the last forward (", s.outer, ", ", s.channels, ", ",
                        s.inner, ")");
        check_state();
        if (shape.per_channel() > 0) {
            detail::check_pointer(grad_y, "grad_y");
            detail::check_pointer(x, "x");
        }
        const std::size_t n = affine_ ? std::size_t(num_features_) : 0;
        std::vector<P> gw(n), gb(n);
        batchnorm::backward(grad_y, x, grad_x, shape, saved_->mean.data(), saved_->invstd.data(),
                            param(weight), affine_ ? gw.data() : nullptr, affine_ ? gb.data() : nullptr,
                            saved_->batch_stats);
        weight_grad = std::move(gw);
        bias_grad = std::move(gb);
    }

    // An Inference<T> with the current running statistics, weight and bias: the eval forward
    // with its factors computed once. Needs track_running_stats().
    Inference<T> inference() const {
        check_state();
        detail::require(track_running_stats_, "inference() needs running statistics (track_running_stats)");
        return Inference<T>(running_mean.data(), running_var.data(), param(weight), param(bias),
                            num_features_, eps_);
    }

private:
    struct Saved {
        Shape shape;
        std::vector<P> mean, invstd;
        bool batch_stats;
        const char* why_not;  // set when this forward cannot be differentiated
    };

    // PyTorch: batch statistics in training, and in eval when there are no running statistics.
    bool use_batch_stats() const { return training_ || !track_running_stats_; }

    static const P* param(const std::vector<P>& v) { return v.empty() ? nullptr : v.data(); }

    void check_size(const std::vector<P>& v, bool present, const char* name) const {
        const std::size_t want = present ? std::size_t(num_features_) : 0;
        detail::require(v.size() == want, name, " must have ", want, " values, got ", v.size());
    }

    void check_state() const {
        check_size(weight, affine_, "weight");
        check_size(bias, affine_, "bias");
        check_size(running_mean, track_running_stats_, "running_mean");
        check_size(running_var, track_running_stats_, "running_var");
    }

    void check_channels(const Shape& shape) const {
        detail::require(shape.channels == num_features_, "x: expected ", num_features_,
                        " channels (num_features), got shape (", shape.outer, ", ", shape.channels, ", ",
                        shape.inner, ")");
    }

    void save(const Shape& shape, std::vector<P> mean, std::vector<P> invstd, bool batch_stats,
              const T* x, const T* y, const char* why_not) {
        if (why_not == nullptr && shape.size() > 0 && static_cast<const void*>(x) == static_cast<const void*>(y))
            why_not = "backward is impossible after an in-place forward (y == x): "
                      "the input it needs was overwritten by the output";
        saved_ = Saved{shape, std::move(mean), std::move(invstd), batch_stats, why_not};
    }

    std::int64_t num_features_;
    double eps_;
    std::optional<double> momentum_;
    bool affine_, track_running_stats_;
    bool training_ = true;
    std::optional<Saved> saved_;
};

}  // namespace batchnorm
