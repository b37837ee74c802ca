// float32 lanes overflow on data whose squares or products pass 3.4e38 (values beyond about
// 1e19, or deviations near 1e38) although every value and the float64 result are finite. The
// kernels stay as they are for ordinary data; a reduction whose float32 partial sums come back
// non-finite is summed again here in float64, one value at a time. Non-finite input gives the
// same NaN or infinity either way, so the check needs no look at the input. float64 data never
// takes this path (its lanes do not overflow before float64 sums would), and float16 data cannot
// reach it (values below 65520); bfloat16 has float32's range and takes it as float32 does.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../kernels/table.hpp"

namespace batchnorm::detail {

template <class T>
bool lanes_overflowed(double a, double b) {
    return std::is_same_v<compute_t<T>, float> && !std::isfinite(a + b);
}

// {sum(x - shift), sum((x - shift)^2)} over `count` runs of `len` values, `stride` apart.
template <class T>
Sums checked_dev(const KernelTable<T>& k, const T* x, std::int64_t count, std::int64_t len, std::int64_t stride,
                 compute_t<T> shift, bool prefetch) {
    Sums s = k.cf_dev(x, count, len, stride, shift, prefetch);
    if (!lanes_overflowed<T>(s.first, s.second)) return s;
    s = Sums{};
    for (std::int64_t r = 0; r < count; ++r)
        for (std::int64_t i = 0; i < len; ++i) {
            const double d = double(x[r * stride + i]) - double(shift);
            s += Sums{d, d * d};
        }
    return s;
}

// {sum(dy*w), sum(dy*w*(x - shift))} over one run of n values; w null means 1.
template <class T>
Sums checked_wdot(const KernelTable<T>& k, const T* dy, const T* x, const compute_t<T>* w, std::int64_t n, compute_t<T> shift) {
    Sums s = w ? k.row_wdot(dy, x, w, n, shift) : k.cf_dot(dy, x, 1, n, n, shift, false);
    if (!lanes_overflowed<T>(s.first, s.second)) return s;
    s = Sums{};
    for (std::int64_t i = 0; i < n; ++i) {
        const double g = double(dy[i]) * (w ? double(w[i]) : 1.0);
        s += Sums{g, g * (double(x[i]) - double(shift))};
    }
    return s;
}

// {sum(dy), sum(dy*(x - shift))} over `count` runs of `len` values, `stride` apart.
template <class T>
Sums checked_dot(const KernelTable<T>& k, const T* dy, const T* x, std::int64_t count, std::int64_t len,
                 std::int64_t stride, compute_t<T> shift, bool prefetch) {
    Sums s = k.cf_dot(dy, x, count, len, stride, shift, prefetch);
    if (!lanes_overflowed<T>(s.first, s.second)) return s;
    s = Sums{};
    for (std::int64_t r = 0; r < count; ++r) s += checked_wdot<T>(k, dy + r * stride, x + r * stride, nullptr, len, shift);
    return s;
}

// After a column kernel filled s1[j], s2[j] with sums over `rows` rows of
// {u, u*v} where u = a(r, j), v = b(r, j): columns that overflowed are summed again in float64.
template <class T, class First, class Second>
void recheck_columns(std::int64_t rows, std::int64_t cols, double* s1, double* s2, First&& first, Second&& second) {
    if constexpr (std::is_same_v<compute_t<T>, float>) {
        for (std::int64_t j = 0; j < cols; ++j) {
            if (!lanes_overflowed<T>(s1[j], s2[j])) continue;
            double a = 0, b = 0;
            for (std::int64_t r = 0; r < rows; ++r) {
                const double u = first(r, j);
                a += u;
                b += u * second(r, j);
            }
            s1[j] = a;
            s2[j] = b;
        }
    }
}

// cl_sum with the float64 fallback: sum must start at zero.
template <class T>
void checked_cl_sum(const KernelTable<T>& k, const T* x, std::int64_t rows, std::int64_t cols, std::int64_t ld,
                    double* sum) {
    k.cl_sum(x, rows, cols, ld, sum);
    for (std::int64_t j = 0; j < cols; ++j) {
        if (!lanes_overflowed<T>(sum[j], 0.0)) continue;
        double a = 0;
        for (std::int64_t r = 0; r < rows; ++r) a += double(x[r * ld + j]);
        sum[j] = a;
    }
}

// cl_dev with the float64 fallback: s1, s2 must start at zero.
template <class T>
void checked_cl_dev(const KernelTable<T>& k, const T* x, std::int64_t rows, std::int64_t cols, std::int64_t ld,
                    const compute_t<T>* shift, double* s1, double* s2, BlockReads reads) {
    k.cl_dev(x, rows, cols, ld, shift, s1, s2, reads);
    const auto dev = [&](std::int64_t r, std::int64_t j) { return double(x[r * ld + j]) - double(shift[j]); };
    recheck_columns<T>(rows, cols, s1, s2, dev, dev);
}

// cl_dot with the float64 fallback: sdy, sdyx must start at zero.
template <class T>
void checked_cl_dot(const KernelTable<T>& k, const T* dy, const T* x, std::int64_t rows, std::int64_t cols,
                    std::int64_t ld, const compute_t<T>* shift, double* sdy, double* sdyx, BlockReads reads) {
    k.cl_dot(dy, x, rows, cols, ld, shift, sdy, sdyx, reads);
    recheck_columns<T>(
        rows, cols, sdy, sdyx, [&](std::int64_t r, std::int64_t j) { return double(dy[r * ld + j]); },
        [&](std::int64_t r, std::int64_t j) { return double(x[r * ld + j]) - double(shift[j]); });
}

}  // namespace batchnorm::detail
