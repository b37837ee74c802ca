// The kernel table: what every ISA backend provides, for one storage type T. Values move as T
// (float, double, float16, bfloat16) and are computed in C = compute_t<T>: scalars and
// per-column arrays (shifts, factors) are C. The driver
// (ISA-neutral, OpenMP) calls only these. Two families:
//  - cf_*: channels-first. One channel's values come as `count` runs of `len` contiguous values,
//    `stride` apart (a run is one (n, c) plane of NCHW). Vectorized along the run.
//  - rows_* and cl_*: row-major tiles of `rows` rows x `cols` contiguous columns, one column per
//    channel (channels-last). Vectorized across columns; per-column results add into float64.
// Reductions accumulate in lanes of T that are flushed to float64 every few vectors, so a float32
// sum never grows long enough to lose the digits the accuracy targets need.
#pragma once

#include <cstdint>
#include <type_traits>  // std::integral_constant, used by kernel_bodies.inl

#include "../dtype.hpp"
#include "../engine/moments.hpp"

namespace batchnorm::detail {

template <class T>
struct KernelTable {
    using i64 = std::int64_t;
    using C = compute_t<T>;
    // {sum(x - shift), sum((x - shift)^2)}
    Sums (*cf_dev)(const T* x, i64 count, i64 len, i64 stride, C shift);
    // {sum(dy), sum(dy * (x - shift))}
    Sums (*cf_dot)(const T* dy, const T* x, i64 count, i64 len, i64 stride, C shift);
    // y = (x - shift) * alpha + beta
    void (*cf_affine)(const T* x, T* y, i64 count, i64 len, i64 stride, C shift, C alpha, C beta);
    // gx = dy * k + (x - shift) * m + q
    void (*cf_grad)(const T* dy, const T* x, T* gx, i64 count, i64 len, i64 stride, C shift, C k,
                    C m, C q);
    // Eval over whole planes in memory order: plane r has channel (first_channel + r) % channels.
    // y = act((x - shift[c]) * alpha[c] + beta[c] + residual), residual may be null.
    void (*rows_affine)(const T* x, const T* residual, T* y, i64 planes, i64 len, i64 first_channel,
                        i64 channels, const C* shift, const C* alpha, const C* beta, bool relu);

    // sum[j] += sum over rows of x[r][j]
    void (*cl_sum)(const T* x, i64 rows, i64 cols, double* sum);
    // s1[j] += sum(x - shift[j]), s2[j] += sum((x - shift[j])^2)
    void (*cl_dev)(const T* x, i64 rows, i64 cols, const C* shift, double* s1, double* s2);
    // sdy[j] += sum(dy), sdyx[j] += sum(dy * (x - shift[j]))
    void (*cl_dot)(const T* dy, const T* x, i64 rows, i64 cols, const C* shift, double* sdy,
                   double* sdyx);
    // y = act((x - shift[j]) * alpha[j] + beta[j] + residual), residual may be null
    void (*cl_affine)(const T* x, const T* residual, T* y, i64 rows, i64 cols, const C* shift,
                      const C* alpha, const C* beta, bool relu);
    // gx = dy * k[j] + (x - shift[j]) * m[j] + q[j]
    void (*cl_grad)(const T* dy, const T* x, T* gx, i64 rows, i64 cols, const C* shift,
                    const C* k, const C* m, const C* q);
};

}  // namespace batchnorm::detail
