// batchnorm::InstanceNorm<T>: PyTorch's nn.InstanceNorm1d/2d/3d.
//
//   batchnorm::InstanceNorm<float> in(64);                  // eps 1e-5, momentum 0.1, no affine,
//                                                           // no running statistics
//   in.forward(x, y, batchnorm::GroupShape{N, 64, H * W});
//   in.backward(grad_y, x, grad_x, shape);
//
// As PyTorch: instance statistics in training and whenever there are no running statistics;
// with track_running_stats, training updates them (momentum std::nullopt means 0: PyTorch
// passes momentum=None as 0.0 and never counts batches) and eval normalizes with them.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "../norms/batch_norm.hpp"
#include "../norms/instance_norm.hpp"
#include "group_norm.hpp"

namespace batchnorm {

template <class T>
class InstanceNorm {
public:
    using P = compute_t<T>;  // parameters, statistics and gradients (float for half storage)

    explicit InstanceNorm(std::int64_t num_features, double eps = 1e-5, std::optional<double> momentum = 0.1,
                          bool affine = false, bool track_running_stats = false)
        : channels_(num_features), eps_(eps), momentum_(momentum), affine_(affine), track_(track_running_stats) {
        detail::check_element_type<T>();
        detail::require(num_features > 0, "num_features must be > 0, got ", num_features);
        detail::check_count("num_features", num_features);
        detail::check_eps(eps);
        if (momentum) detail::check_momentum(*momentum);
        reset_parameters();
    }

    std::vector<P> weight, bias;               // num_features values each, empty when !affine
    std::vector<P> running_mean, running_var;  // num_features values each, empty when !track_running_stats
    std::vector<P> weight_grad, bias_grad;     // set by backward()

    std::int64_t num_features() const { return channels_; }
    double eps() const { return eps_; }
    std::optional<double> momentum() const { return momentum_; }
    bool affine() const { return affine_; }
    bool track_running_stats() const { return track_; }
    bool training() const { return training_; }
    InstanceNorm& train(bool mode = true) {
        training_ = mode;
        return *this;
    }
    InstanceNorm& eval() { return train(false); }

    void reset_running_stats() {
        running_mean.assign(track_ ? std::size_t(channels_) : 0, P(0));
        running_var.assign(track_ ? std::size_t(channels_) : 0, P(1));
    }
    void reset_parameters() {
        reset_running_stats();
        weight.assign(affine_ ? std::size_t(channels_) : 0, P(1));
        bias.assign(affine_ ? std::size_t(channels_) : 0, P(0));
    }

    void forward(const T* x, T* y, const GroupShape& shape, Activation act = Activation::none) {
        detail::check_layer_shape(shape, nullptr, channels_);
        check_params();
        const P *w = detail::param_or_null(weight), *b = detail::param_or_null(bias);
        const char* why_not = act != Activation::none ? "backward is not available after a forward with activation"
                                                      : detail::in_place_reason(x, y, shape.size() > 0);
        if (training_ || !track_) {
            const bool update = training_ && track_;
            std::vector<P> mean(static_cast<std::size_t>(shape.batch * channels_)), invstd(mean.size());
            instance_norm(x, y, shape, w, b, update ? running_mean.data() : nullptr, update ? running_var.data() : nullptr,
                          momentum_.value_or(0.0), eps_, mean.data(), invstd.data(), act);
            saved_ = Saved{shape, std::move(mean), std::move(invstd), why_not};
            batch_stats_ = true;
            return;
        }
        const Shape view = bn_view(shape);
        forward_eval(x, y, view, running_mean.data(), running_var.data(), w, b, eps_, static_cast<const T*>(nullptr), act);
        std::vector<P> invstd(static_cast<std::size_t>(channels_));
        for (std::size_t c = 0; c < invstd.size(); ++c) invstd[c] = P(detail::invstd_of(double(running_var[c]), eps_));
        saved_ = Saved{shape, running_mean, std::move(invstd), why_not};
        batch_stats_ = false;
    }

    void backward(const T* grad_y, const T* x, T* grad_x, const GroupShape& shape) {
        const Saved& s = detail::saved_for_backward(saved_);
        detail::check_layer_shape(shape, &s.size, channels_);
        check_params();
        std::vector<P> gw(weight.size()), gb(bias.size());
        P *pw = affine_ ? gw.data() : nullptr, *pb = affine_ ? gb.data() : nullptr;
        if (batch_stats_)
            group_norm_backward(grad_y, x, grad_x, shape, channels_, s.mean.data(), s.invstd.data(),
                                detail::param_or_null(weight), pw, pb);
        else
            batchnorm::backward(grad_y, x, grad_x, bn_view(shape), s.mean.data(), s.invstd.data(),
                                detail::param_or_null(weight), pw, pb, false);
        weight_grad = std::move(gw);
        bias_grad = std::move(gb);
    }

private:
    using Saved = detail::Saved<P, GroupShape>;

    // Per-channel statistics over (sample, spatial): batch norm's view of the same memory.
    static Shape bn_view(const GroupShape& s) {
        return s.channels_last ? Shape{s.batch * s.spatial, s.channels, 1} : Shape{s.batch, s.channels, s.spatial};
    }

    void check_params() const {
        detail::check_param(weight, affine_ ? std::size_t(channels_) : 0, "weight");
        detail::check_param(bias, affine_ ? std::size_t(channels_) : 0, "bias");
        detail::check_param(running_mean, track_ ? std::size_t(channels_) : 0, "running_mean");
        detail::check_param(running_var, track_ ? std::size_t(channels_) : 0, "running_var");
    }

    std::int64_t channels_;
    double eps_;
    std::optional<double> momentum_;
    bool affine_, track_;
    bool training_ = true;
    bool batch_stats_ = true;
    std::optional<Saved> saved_;
};

}  // namespace batchnorm
