// batchnorm::LayerNorm<T>: PyTorch's nn.LayerNorm over rows of the normalized shape.
//
//   batchnorm::LayerNorm<float> ln({768});                  // eps 1e-5, weight and bias
//   ln.forward(x, y, rows);                                 // x: rows x 768 values
//   ln.forward(x, y, rows, residual, sum_out);              // LN(x + residual), sum_out = x + residual
//   ln.backward(grad_y, x, grad_x, rows);                   // sets weight_grad, bias_grad
//
// weight (ones) and bias (zeros) hold prod(normalized_shape) values, empty when
// elementwise_affine is false (bias also when bias is false). backward() uses the statistics
// saved by the last forward and the x passed again, unchanged.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "../norms/layer_norm.hpp"
#include "saved.hpp"

namespace batchnorm {

template <class T>
class LayerNorm {
public:
    using P = compute_t<T>;  // parameters, statistics and gradients (float for half storage)

    // with_bias: torch's `bias` argument (named apart from the member `bias`, which it would shadow)
    explicit LayerNorm(std::vector<std::int64_t> normalized_shape, double eps = 1e-5, bool elementwise_affine = true,
                       bool with_bias = true)
        : shape_(std::move(normalized_shape)), eps_(eps), affine_(elementwise_affine),
          has_bias_(elementwise_affine && with_bias) {
        detail::check_element_type<T>();
        detail::check_eps(eps);
        size_ = detail::normalized_size(shape_);
        reset_parameters();
    }

    std::vector<P> weight, bias;            // size() values each when present, else empty
    std::vector<P> weight_grad, bias_grad;  // set by backward()

    const std::vector<std::int64_t>& normalized_shape() const { return shape_; }
    std::int64_t size() const { return size_; }  // values per row: prod(normalized_shape)
    double eps() const { return eps_; }
    bool elementwise_affine() const { return affine_; }

    void reset_parameters() {
        weight.assign(affine_ ? std::size_t(size_) : 0, P(1));
        bias.assign(has_bias_ ? std::size_t(size_) : 0, P(0));
    }

    // Normalizes `rows` rows of size() values; y may be x. residual (same size) gives
    // LN(x + residual), and sum_out (optional) receives x + residual.
    void forward(const T* x, T* y, std::int64_t rows, const T* residual = nullptr, T* sum_out = nullptr) {
        check_params();
        detail::check_rows(rows, size_);  // before the statistics' buffers are sized by it
        std::vector<P> mean(static_cast<std::size_t>(rows)), invstd(mean.size());
        layer_norm(x, y, rows, size_, detail::param_or_null(weight), detail::param_or_null(bias), eps_, mean.data(),
                   invstd.data(), residual, sum_out);
        const char* why_not = residual ? "backward is not available after a forward with residual"
                                       : detail::in_place_reason(x, y, rows * size_ > 0);
        saved_ = Saved{rows, std::move(mean), std::move(invstd), why_not};
    }

    // Gradient of the last forward: grad_x (may be null) and weight_grad, bias_grad.
    void backward(const T* grad_y, const T* x, T* grad_x, std::int64_t rows) {
        const Saved& s = detail::saved_for_backward(saved_);
        detail::require(rows == s.size, "backward: rows (", rows, ") is not the rows of the last forward (", s.size, ")");
        check_params();
        std::vector<P> gw(weight.size()), gb(bias.size());
        layer_norm_backward(grad_y, x, grad_x, rows, size_, s.mean.data(), s.invstd.data(), detail::param_or_null(weight),
                            affine_ ? gw.data() : nullptr, has_bias_ ? gb.data() : nullptr);
        weight_grad = std::move(gw);
        bias_grad = std::move(gb);
    }

private:
    using Saved = detail::Saved<P, std::int64_t>;

    void check_params() const {
        detail::check_param(weight, affine_ ? std::size_t(size_) : 0, "weight");
        detail::check_param(bias, has_bias_ ? std::size_t(size_) : 0, "bias");
    }

    std::vector<std::int64_t> shape_;
    std::int64_t size_;
    double eps_;
    bool affine_, has_bias_;
    std::optional<Saved> saved_;
};

}  // namespace batchnorm
