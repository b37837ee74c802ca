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
    static constexpr bool kOverlapTails = false;  // lane loads and stores are cheap
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
    static V div(V a, V b) { return vdivq_f64(a, b); }
    static V sqrt(V a) { return vsqrtq_f64(a); }
    // Per-channel float32 values in float64 lanes (exact), and back rounded to nearest.
    static V load(const float* p) { return vcvt_f64_f32(vld1_f32(p)); }
    static void store(float* p, V v) { vst1_f32(p, vcvt_f32_f64(v)); }
    // FMAX, not FMAXNM: a NaN input stays NaN, as std::max(NaN, 0) does in the scalar backend.
    static V max(V a, V b) { return vmaxq_f64(a, b); }
    static double sum_lanes(V v) { return vaddvq_f64(v); }
    // Lane i: the sum of v[i]'s lanes, for W vectors.
    static V sum_each(const V* v) { return vpaddq_f64(v[0], v[1]); }
    static void add_lanes_to(double* dst, V v) { vst1q_f64(dst, vaddq_f64(vld1q_f64(dst), v)); }
    static void add_lanes_to_partial(double* dst, V v, std::int64_t n) {
        double lanes[2];  // through memory, not v[i]: MSVC's NEON types cannot be subscripted
        vst1q_f64(lanes, v);
        for (std::int64_t i = 0; i < n; ++i) dst[i] += lanes[i];
    }
};

// Half storage (half.hpp): four 16-bit values widen to a float vector and narrow back, rounding
// to nearest even (FCVTL/FCVTN for float16, in FPCR's default rounding mode; shifts for bfloat16).
template <class H>
struct HalfConvert;

template <>
struct HalfConvert<float16> {
    static float32x4_t widen(uint16x4_t h) { return vcvt_f32_f16(vreinterpret_f16_u16(h)); }
    static uint16x4_t narrow(float32x4_t v) { return vreinterpret_u16_f16(vcvt_f16_f32(v)); }
};

template <>
struct HalfConvert<bfloat16> {
    static float32x4_t widen(uint16x4_t h) { return vreinterpretq_f32_u32(vshll_n_u16(h, 16)); }
    // half.hpp's float_to_bfloat, lane by lane: round to nearest even, NaN made quiet.
    static uint16x4_t narrow(float32x4_t v) {
        const uint32x4_t u = vreinterpretq_u32_f32(v);
        const uint32x4_t odd = vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1));
        const uint32x4_t rounded = vaddq_u32(u, vaddq_u32(vdupq_n_u32(0x7FFF), odd));
        const uint32x4_t nan = vcgtq_u32(vandq_u32(u, vdupq_n_u32(0x7FFFFFFF)), vdupq_n_u32(0x7F800000));
        const uint32x4_t chosen = vbslq_u32(nan, vorrq_u32(u, vdupq_n_u32(0x400000)), rounded);
        return vshrn_n_u32(chosen, 16);
    }
};

template <>
struct Ops<float> {
    using V = float32x4_t;
    static constexpr std::int64_t W = 4;
    static constexpr bool kOverlapTails = false;
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
    // Half storage: Ops<float> is the compute type of float16 and bfloat16 (kernel_bodies.inl
    // loads and stores S through it). Tails move one 16-bit lane at a time, as for float.
    template <class H>
    static const std::uint16_t* bits(const H* p) { return reinterpret_cast<const std::uint16_t*>(p); }
    template <class H>
    static std::uint16_t* bits(H* p) { return reinterpret_cast<std::uint16_t*>(p); }
    template <class H>
    static V load(const H* p) { return HalfConvert<H>::widen(vld1_u16(bits(p))); }
    template <class H>
    static V load_partial(const H* p, std::int64_t n, V fill) {
        uint16x4_t h = vdup_n_u16(0);
        uint32x4_t keep = vdupq_n_u32(0);  // lanes >= n keep fill
        switch (n) {
            case 3: h = vld1_lane_u16(bits(p) + 2, h, 2); keep = vsetq_lane_u32(~0u, keep, 2); [[fallthrough]];
            case 2: h = vld1_lane_u16(bits(p) + 1, h, 1); keep = vsetq_lane_u32(~0u, keep, 1); [[fallthrough]];
            case 1: h = vld1_lane_u16(bits(p), h, 0); keep = vsetq_lane_u32(~0u, keep, 0); [[fallthrough]];
            default: break;
        }
        return vbslq_f32(keep, HalfConvert<H>::widen(h), fill);
    }
    template <class H>
    static void store(H* p, V v) { vst1_u16(bits(p), HalfConvert<H>::narrow(v)); }
    template <class H>
    static void store_partial(H* p, V v, std::int64_t n) {
        const uint16x4_t h = HalfConvert<H>::narrow(v);
        switch (n) {
            case 3: vst1_lane_u16(bits(p) + 2, h, 2); [[fallthrough]];
            case 2: vst1_lane_u16(bits(p) + 1, h, 1); [[fallthrough]];
            case 1: vst1_lane_u16(bits(p), h, 0); [[fallthrough]];
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
    // In float32, unlike sum_lanes: the reductions count these adds against kFlushVectors.
    static V sum_each(const V* v) { return vpaddq_f32(vpaddq_f32(v[0], v[1]), vpaddq_f32(v[2], v[3])); }
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
