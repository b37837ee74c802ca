// NEON backend (aarch64). Advanced SIMD is part of the AArch64 baseline, so there is no target
// region and no runtime check. NEON has no masked loads or stores: a tail of n < W elements moves
// one lane at a time (vld1q_lane / vst1q_lane), so nothing past p + n is ever read or written,
// and a channels-last row with a tail in every vector costs no memcpy call.
#pragma once

#if defined(__aarch64__)
#define BATCHNORM_HAS_NEON_BACKEND 1

#include <arm_neon.h>

#include <algorithm>
#include <cstdint>

#include "table.hpp"

namespace batchnorm::detail::neon {

template <class T>
struct Ops;

template <>
struct Ops<double> {
    using V = float64x2_t;
    static constexpr std::int64_t W = 2;
    static V zero() { return vdupq_n_f64(0.0); }
    static V set1(double v) { return vdupq_n_f64(v); }
    static V load(const double* p) { return vld1q_f64(p); }
    // A tail of a 2-lane vector is one element (n = 1).
    static V load_partial(const double* p, std::int64_t n, V fill) { return n > 0 ? vld1q_lane_f64(p, fill, 0) : fill; }
    static void store(double* p, V v) { vst1q_f64(p, v); }
    static void store_partial(double* p, V v, std::int64_t n) { if (n > 0) vst1q_lane_f64(p, v, 0); }
    static V add(V a, V b) { return vaddq_f64(a, b); }
    static V sub(V a, V b) { return vsubq_f64(a, b); }
    static V mul(V a, V b) { return vmulq_f64(a, b); }
    static V fma(V a, V b, V c) { return vfmaq_f64(c, a, b); }  // vfmaq(c, a, b) = c + a*b
    // FMAX, not FMAXNM: a NaN input stays NaN, as std::max(NaN, 0) does in the scalar backend.
    static V max(V a, V b) { return vmaxq_f64(a, b); }
    static double sum_lanes(V v) { return vaddvq_f64(v); }
    static void add_lanes_to(double* dst, V v) { vst1q_f64(dst, vaddq_f64(vld1q_f64(dst), v)); }
    static void add_lanes_to_partial(double* dst, V v, std::int64_t n) {
        double lanes[2];  // through memory, not v[i]: MSVC's NEON types cannot be subscripted
        vst1q_f64(lanes, v);
        for (std::int64_t i = 0; i < n; ++i) dst[i] += lanes[i];
    }
};

template <>
struct Ops<float> {
    using V = float32x4_t;
    static constexpr std::int64_t W = 4;
    static V zero() { return vdupq_n_f32(0.0f); }
    static V set1(float v) { return vdupq_n_f32(v); }
    static V load(const float* p) { return vld1q_f32(p); }
    static V load_partial(const float* p, std::int64_t n, V fill) {
        switch (n) {  // lanes n-1 down to 0; lanes >= n keep fill
            case 3: fill = vld1q_lane_f32(p + 2, fill, 2); [[fallthrough]];
            case 2: fill = vld1q_lane_f32(p + 1, fill, 1); [[fallthrough]];
            case 1: fill = vld1q_lane_f32(p, fill, 0); [[fallthrough]];
            default: return fill;
        }
    }
    static void store(float* p, V v) { vst1q_f32(p, v); }
    static void store_partial(float* p, V v, std::int64_t n) {
        switch (n) {
            case 3: vst1q_lane_f32(p + 2, v, 2); [[fallthrough]];
            case 2: vst1q_lane_f32(p + 1, v, 1); [[fallthrough]];
            case 1: vst1q_lane_f32(p, v, 0); [[fallthrough]];
            default: break;
        }
    }
    static V add(V a, V b) { return vaddq_f32(a, b); }
    static V sub(V a, V b) { return vsubq_f32(a, b); }
    static V mul(V a, V b) { return vmulq_f32(a, b); }
    static V fma(V a, V b, V c) { return vfmaq_f32(c, a, b); }
    static V max(V a, V b) { return vmaxq_f32(a, b); }
    // Lanes widen to float64 (exactly) before any addition, so a flush loses no digits.
    static float64x2_t low(V v) { return vcvt_f64_f32(vget_low_f32(v)); }
    static float64x2_t high(V v) { return vcvt_high_f64_f32(v); }
    static double sum_lanes(V v) { return vaddvq_f64(vaddq_f64(low(v), high(v))); }
    static void add_lanes_to(double* dst, V v) {
        Ops<double>::add_lanes_to(dst, low(v));
        Ops<double>::add_lanes_to(dst + 2, high(v));
    }
    static void add_lanes_to_partial(double* dst, V v, std::int64_t n) {
        double lanes[4];
        vst1q_f64(lanes, low(v));
        vst1q_f64(lanes + 2, high(v));
        for (std::int64_t i = 0; i < n; ++i) dst[i] += lanes[i];
    }
};

#include "kernel_bodies.inl"

template <class T>
const KernelTable<T>& table() {
    static const KernelTable<T> kernels = make_table<T>();
    return kernels;
}

}  // namespace batchnorm::detail::neon

#endif  // aarch64
