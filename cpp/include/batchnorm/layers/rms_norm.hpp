// batchnorm::RMSNorm<T>: PyTorch's nn.RMSNorm, y = x/sqrt(mean(x^2) + eps)*weight per row.
//
//   batchnorm::RMSNorm<float> rms({4096});                  // eps: machine epsilon of compute_t<T>
//   rms.forward(x, y, rows);
//   rms.backward(grad_y, x, grad_x, rows);                  // sets weight_grad
#pragma once

#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "../norms/rms_norm.hpp"
#include "saved.hpp"

namespace batchnorm {

template <class T>
class RMSNorm {
public:
    using P = compute_t<T>;  // parameters, statistics and gradients (float for half storage)

    // eps std::nullopt is PyTorch's eps=None: the machine epsilon of the compute type (float for
    // half storage, as PyTorch's opmath type).
    explicit RMSNorm(std::vector<std::int64_t> normalized_shape, std::optional<double> eps = std::nullopt,
                     bool elementwise_affine = true)
        : shape_(std::move(normalized_shape)), eps_(eps ? *eps : double(std::numeric_limits<P>::epsilon())),
          affine_(elementwise_affine) {
        detail::check_element_type<T>();
        detail::check_eps(eps_);
        size_ = detail::normalized_size(shape_);
        reset_parameters();
    }

    std::vector<P> weight;       // size() values when elementwise_affine, else empty
    std::vector<P> weight_grad;  // set by backward()

    const std::vector<std::int64_t>& normalized_shape() const { return shape_; }
    std::int64_t size() const { return size_; }
    double eps() const { return eps_; }
    bool elementwise_affine() const { return affine_; }

    void reset_parameters() { weight.assign(affine_ ? std::size_t(size_) : 0, P(1)); }

    void forward(const T* x, T* y, std::int64_t rows, const T* residual = nullptr, T* sum_out = nullptr) {
        detail::check_param(weight, affine_ ? std::size_t(size_) : 0, "weight");
        detail::check_rows(rows, size_);  // before the statistics' buffer is sized by it
        std::vector<P> rrms(static_cast<std::size_t>(rows));
        rms_norm(x, y, rows, size_, detail::param_or_null(weight), eps_, rrms.data(), residual, sum_out);
        const char* why_not = residual ? "backward is not available after a forward with residual"
                                       : detail::in_place_reason(x, y, rows * size_ > 0);
        saved_ = Saved{rows, {}, std::move(rrms), why_not};
    }

    void backward(const T* grad_y, const T* x, T* grad_x, std::int64_t rows) {
        const Saved& s = detail::saved_for_backward(saved_);
        detail::require(rows == s.size, "backward: rows (", rows, ") is not the rows of the last forward (", s.size, ")");
        detail::check_param(weight, affine_ ? std::size_t(size_) : 0, "weight");
        std::vector<P> gw(weight.size());
        rms_norm_backward(grad_y, x, grad_x, rows, size_, s.invstd.data(), detail::param_or_null(weight),
                          affine_ ? gw.data() : nullptr);
        weight_grad = std::move(gw);
    }

private:
    using Saved = detail::Saved<P, std::int64_t>;

    std::vector<std::int64_t> shape_;
    std::int64_t size_;
    double eps_;
    bool affine_;
    std::optional<Saved> saved_;
};

}  // namespace batchnorm
