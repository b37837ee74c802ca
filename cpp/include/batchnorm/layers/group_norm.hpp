// batchnorm::GroupNorm<T>: PyTorch's nn.GroupNorm.
//
//   batchnorm::GroupNorm<float> gn(32, 320);                // eps 1e-5, affine
//   batchnorm::GroupShape shape{N, 320, H * W};             // channels_last = true for NHWC memory
//   gn.forward(x, y, shape);                                // or with batchnorm::Activation::relu
//   gn.backward(grad_y, x, grad_x, shape);                  // sets weight_grad, bias_grad
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "../norms/group_norm.hpp"
#include "saved.hpp"

namespace batchnorm {

namespace detail {

inline bool same_group_shape(const GroupShape& a, const GroupShape& b) {
    return a.batch == b.batch && a.channels == b.channels && a.spatial == b.spatial && a.channels_last == b.channels_last;
}

inline void check_layer_shape(const GroupShape& shape, const GroupShape* saved, std::int64_t channels) {
    check_group_shape(shape, 1);  // before the statistics' buffers are sized by it
    require(shape.channels == channels, "x: expected ", channels, " channels, got shape (", shape.batch, ", ",
            shape.channels, ", ", shape.spatial, ")");
    require(saved == nullptr || same_group_shape(shape, *saved), "backward: the shape is not the shape of the last forward");
}

}  // namespace detail

template <class T>
class GroupNorm {
public:
    using P = compute_t<T>;  // parameters, statistics and gradients (float for half storage)

    GroupNorm(std::int64_t num_groups, std::int64_t num_channels, double eps = 1e-5, bool affine = true)
        : groups_(num_groups), channels_(num_channels), eps_(eps), affine_(affine) {
        detail::check_element_type<T>();
        detail::require(num_groups > 0, "num_groups must be positive, got ", num_groups);
        detail::check_count("num_channels", num_channels);
        detail::require(num_channels % num_groups == 0, "num_channels must be divisible by num_groups");
        detail::check_eps(eps);
        reset_parameters();
    }

    std::vector<P> weight, bias;            // num_channels values each, empty when !affine
    std::vector<P> weight_grad, bias_grad;  // set by backward()

    std::int64_t num_groups() const { return groups_; }
    std::int64_t num_channels() const { return channels_; }
    double eps() const { return eps_; }
    bool affine() const { return affine_; }

    void reset_parameters() {
        weight.assign(affine_ ? std::size_t(channels_) : 0, P(1));
        bias.assign(affine_ ? std::size_t(channels_) : 0, P(0));
    }

    void forward(const T* x, T* y, const GroupShape& shape, Activation act = Activation::none) {
        detail::check_layer_shape(shape, nullptr, channels_);
        check_params();
        std::vector<P> mean(static_cast<std::size_t>(shape.batch * groups_)), invstd(mean.size());
        group_norm(x, y, shape, groups_, detail::param_or_null(weight), detail::param_or_null(bias), eps_, mean.data(),
                   invstd.data(), act);
        const char* why_not = act != Activation::none ? "backward is not available after a forward with activation"
                                                      : detail::in_place_reason(x, y, shape.size() > 0);
        saved_ = Saved{shape, std::move(mean), std::move(invstd), why_not};
    }

    void backward(const T* grad_y, const T* x, T* grad_x, const GroupShape& shape) {
        const Saved& s = detail::saved_for_backward(saved_);
        detail::check_layer_shape(shape, &s.size, channels_);
        check_params();
        std::vector<P> gw(weight.size()), gb(bias.size());
        group_norm_backward(grad_y, x, grad_x, shape, groups_, s.mean.data(), s.invstd.data(),
                            detail::param_or_null(weight), affine_ ? gw.data() : nullptr, affine_ ? gb.data() : nullptr);
        weight_grad = std::move(gw);
        bias_grad = std::move(gb);
    }

private:
    using Saved = detail::Saved<P, GroupShape>;

    void check_params() const {
        detail::check_param(weight, affine_ ? std::size_t(channels_) : 0, "weight");
        detail::check_param(bias, affine_ ? std::size_t(channels_) : 0, "bias");
    }

    std::int64_t groups_, channels_;
    double eps_;
    bool affine_;
    std::optional<Saved> saved_;
};

}  // namespace batchnorm
