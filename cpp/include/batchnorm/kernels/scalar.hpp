// Scalar backend: the reference every vector backend is tested against, and the fallback on any
// CPU. One lane; the compiler may still vectorize the element-wise loops.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "table.hpp"

namespace batchnorm::detail::scalar {

template <class T>
struct Ops {
    using V = T;
    static constexpr std::int64_t W = 1;
    static constexpr bool kOverlapTails = false;  // no partial vectors
    static V zero() { return T(0); }
    static V set1(T v) { return v; }
    // S: any storage type computed in T (T itself, or a half type whose conversions in half.hpp
    // are the reference the vector backends match).
    template <class S>
    static V load(const S* p) { return V(*p); }
    template <class S>
    static V load_partial(const S*, std::int64_t, V fill) { return fill; }  // never reached: W = 1
    template <class S>
    static void store(S* p, V v) { *p = S(v); }
    template <class S>
    static void store_partial(S*, V, std::int64_t) {}
    static V add(V a, V b) { return a + b; }
    static V sub(V a, V b) { return a - b; }
    static V mul(V a, V b) { return a * b; }
    static V fma(V a, V b, V c) { return a * b + c; }
    static V div(V a, V b) { return a / b; }
    static V sqrt(V a) { return std::sqrt(a); }
    static V max(V a, V b) { return std::max(a, b); }
    static double sum_lanes(V v) { return double(v); }
    static V sum_each(const V* v) { return v[0]; }
    static void add_lanes_to(double* dst, V v) { *dst += double(v); }
    static void add_lanes_to_partial(double*, V, std::int64_t) {}
};

#include "kernel_bodies.inl"

template <class T>
const KernelTable<T>& table() {
    static const KernelTable<T> kernels = make_table<T>();
    return kernels;
}

}  // namespace batchnorm::detail::scalar
