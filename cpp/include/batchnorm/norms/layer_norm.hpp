// Layer normalization (PyTorch's LayerNorm): each row of the trailing `cols` values (the
// normalized shape, flattened) normalized by its own mean and biased variance, then an
// element-wise affine map along the row. Optionally fused with a residual add:
// LN(x + residual), writing x + residual to sum_out (ONNX Runtime's SkipLayerNormalization).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "../engine/rows.hpp"
#include "common.hpp"

namespace batchnorm {
namespace detail {

inline void check_rows(std::int64_t rows, std::int64_t cols) {
    require(rows >= 0 && cols >= 0, "shape: rows and cols must be non-negative, got (", rows, ", ", cols, ")");
    require(cols <= kMaxElements && product_within(rows, cols, kMaxElements), "shape: (", rows, ", ", cols,
            ") has more than ", kMaxElements, " elements");
}

// The checks and empty-input handling layer_norm and rms_norm share; false: nothing to do.
template <class T>
bool begin_rows(const T* x, const T* y, std::int64_t rows, std::int64_t cols, double eps, const T* residual,
                const T* sum_out, compute_t<T>* save_a, compute_t<T>* save_b) {
    using P = compute_t<T>;
    check_element_type<T>();
    check_rows(rows, cols);
    check_eps(eps);
    require(sum_out == nullptr || residual != nullptr, "sum_out needs a residual");
    if (rows * cols == 0) {
        if (save_a) std::fill_n(save_a, rows, std::numeric_limits<P>::quiet_NaN());
        if (save_b) std::fill_n(save_b, rows, std::numeric_limits<P>::quiet_NaN());
        return false;
    }
    check_pointer(x, "x");
    check_pointer(y, "y");
    return true;
}

// The row backward (rows.hpp) with grad_weight[j] = sum over rows of dy*(x - shift)*scale and
// grad_bias[j] = sum of dy, when wanted.
template <class T, class Finish>
void norm_rows_backward(const T* dy, const T* x, T* gx, std::int64_t rows, std::int64_t cols,
                        const compute_t<T>* weight, const compute_t<T>* shift, const compute_t<T>* scale,
                        compute_t<T>* grad_weight, compute_t<T>* grad_bias, Finish&& finish) {
    using P = compute_t<T>;
    const bool sums = grad_weight || grad_bias;
    std::vector<double> sdy(sums ? static_cast<std::size_t>(cols) : 0), sdyx(sdy.size());
    backward_rows(dy, x, gx, rows, cols, weight, shift, scale, sums ? sdy.data() : nullptr, sdyx.data(), finish);
    for (std::int64_t j = 0; sums && j < cols; ++j) {
        if (grad_weight) grad_weight[j] = P(sdyx[std::size_t(j)]);
        if (grad_bias) grad_bias[j] = P(sdy[std::size_t(j)]);
    }
}

}  // namespace detail

// LayerNorm forward over `rows` rows of `cols` values: y = (x - mean)/sqrt(var + eps)*weight + bias
// (weight/bias: cols values, null means 1/0). save_mean/save_invstd (optional, rows values).
// With residual (same size as x) the input is x + residual, also written to sum_out when given.
// T is the storage type of x, y, residual and sum_out; weight, bias and the statistics are
// compute_t<T> (float for float16 and bfloat16), as in batch_norm.hpp.
template <class T>
void layer_norm(const T* x, T* y, std::int64_t rows, std::int64_t cols, const compute_t<T>* weight,
                const compute_t<T>* bias, double eps, compute_t<T>* save_mean = nullptr,
                compute_t<T>* save_invstd = nullptr, const detail::identity_t<T>* residual = nullptr,
                detail::identity_t<T>* sum_out = nullptr) {
    using P = compute_t<T>;
    if (!detail::begin_rows(x, y, rows, cols, eps, residual, sum_out, save_mean, save_invstd)) return;
    detail::normalize_rows<detail::Moments>(
        x, y, rows, cols, weight, bias, residual, sum_out,
        [](const auto& k, const T* src, const Shape& seg, std::int64_t r, std::int64_t b, std::int64_t e) {
            return detail::range_moments(k, src, seg, r, b, e, false);
        },
        [&](std::int64_t r, const detail::Moments& m) {
            const double invstd = detail::invstd_of(m.biased_var(), eps);
            if (save_mean) save_mean[r] = P(m.mean());
            if (save_invstd) save_invstd[r] = P(invstd);
            // affine_for's rule with alpha = invstd, beta = 0: the shift's rounding moves into offset.
            const detail::ChannelAffine<P> a = detail::affine_for<P>(m, invstd, 1.0, 0.0);
            return detail::RowScale<P>{a.shift, a.alpha, a.beta};
        });
}

// LayerNorm backward from the saved mean and invstd (rows values each). grad_x, grad_weight
// and grad_bias (cols values) may each be null; weight null means 1.
template <class T>
void layer_norm_backward(const T* grad_y, const T* x, detail::identity_t<T>* grad_x, std::int64_t rows,
                         std::int64_t cols, const compute_t<T>* mean, const compute_t<T>* invstd, const compute_t<T>* weight,
                         compute_t<T>* grad_weight, compute_t<T>* grad_bias) {
    using P = compute_t<T>;
    detail::check_element_type<T>();
    detail::check_rows(rows, cols);
    if (rows * cols == 0) {
        if (grad_weight) std::fill_n(grad_weight, cols, P(0));
        if (grad_bias) std::fill_n(grad_bias, cols, P(0));
        return;
    }
    detail::check_pointer(grad_y, "grad_y");
    detail::check_pointer(x, "x");
    detail::check_pointer(mean, "mean");
    detail::check_pointer(invstd, "invstd");
    const double inv_n = 1.0 / double(cols);
    detail::norm_rows_backward(grad_y, x, grad_x, rows, cols, weight, mean, invstd, grad_weight, grad_bias,
                               [&](std::int64_t r, const detail::Sums& s) {
                                   const double is = double(invstd[r]);
                                   const auto [m, q] = detail::through_statistics(is, s.first, s.second, inv_n);
                                   return detail::GradCoefficients<P>{mean[r], P(is), P(m), P(q)};
                               });
}

}  // namespace batchnorm
