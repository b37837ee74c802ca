// RMS normalization (PyTorch's RMSNorm): layer normalization without the mean,
// y = x/sqrt(mean(x^2) + eps)*weight over each row; same residual fusion as layer_norm.
#pragma once

#include <cstdint>
#include <vector>

#include "layer_norm.hpp"

namespace batchnorm {

// RMSNorm forward; save_rrms (optional, rows values) receives 1/sqrt(mean(x^2) + eps).
// T is the storage type; weight and save_rrms are compute_t<T> (as in layer_norm).
template <class T>
void rms_norm(const T* x, T* y, std::int64_t rows, std::int64_t cols, const compute_t<T>* weight, double eps,
              compute_t<T>* save_rrms = nullptr, const detail::identity_t<T>* residual = nullptr,
              detail::identity_t<T>* sum_out = nullptr) {
    using P = compute_t<T>;
    if (!detail::begin_rows(x, y, rows, cols, eps, residual, sum_out, save_rrms, static_cast<P*>(nullptr))) return;
    detail::normalize_rows<detail::Sums>(
        x, y, rows, cols, weight, static_cast<const P*>(nullptr), residual, sum_out,
        [](const auto& k, const T* src, const Shape& seg, std::int64_t r, std::int64_t b, std::int64_t e) {
            return detail::range_dev(k, src, seg, r, b, e, P(0), false);
        },
        [&](std::int64_t r, const detail::Sums& s) {
            const double rrms = detail::invstd_of(s.second / double(cols), eps);
            if (save_rrms) save_rrms[r] = P(rrms);
            return detail::RowScale<P>{P(0), P(rrms), P(0)};
        });
}

// RMSNorm backward from the saved rrms: with b = sum(dy*w*x) over the row,
// grad_x = rrms*w*dy - x*rrms^3*b/cols; grad_weight[j] = sum over rows of dy*x*rrms.
template <class T>
void rms_norm_backward(const T* grad_y, const T* x, detail::identity_t<T>* grad_x, std::int64_t rows,
                       std::int64_t cols, const compute_t<T>* rrms, const compute_t<T>* weight, compute_t<T>* grad_weight) {
    using P = compute_t<T>;
    detail::check_element_type<T>();
    detail::check_rows(rows, cols);
    if (rows * cols == 0) {
        if (grad_weight) std::fill_n(grad_weight, cols, P(0));
        return;
    }
    detail::check_pointer(grad_y, "grad_y");
    detail::check_pointer(x, "x");
    detail::check_pointer(rrms, "rrms");
    const std::vector<P> zeros(static_cast<std::size_t>(rows), P(0));
    const double inv_n = 1.0 / double(cols);
    detail::norm_rows_backward(grad_y, x, grad_x, rows, cols, weight, zeros.data(), rrms, grad_weight,
                               static_cast<P*>(nullptr), [&](std::int64_t r, const detail::Sums& s) {
                                   const double is = double(rrms[r]);
                                   const double m = detail::through_statistics(is, s.first, s.second, inv_n).first;
                                   return detail::GradCoefficients<P>{P(0), P(is), P(m), P(0)};
                               });
}

}  // namespace batchnorm
