// AVX2 + FMA + F16C backend (x86-64). Compiled inside a target region, so users need no -mavx2 flag;
// dispatch calls it only after CPUID and XGETBV confirm the CPU and OS support it.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#define BATCHNORM_HAS_AVX2_BACKEND 1

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "table.hpp"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

namespace batchnorm::detail::avx2 {

// An integer of the bits at p, and back: memcpy of a constant size, one move, no call.
template <class I>
inline I load_bits(const void* p) {
    I v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
template <class I>
inline void store_bits(void* p, I v) {
    std::memcpy(p, &v, sizeof v);
}

// Lane mask with the first n (< lanes) 32- or 64-bit lanes set, for maskload.
// Partial stores do not use maskstore: VMASKMOVPS/PD to memory is microcoded on AMD cores
// before Zen 4 (tens of cycles each), and a channels-first call stores one partial vector per
// plane. Two or three plain stores of the vector's halves and quarters, chosen by the bits of
// n (the same n plane after plane, so the branches predict), cost a few cycles on every core.
// AMD EPYC (Zen 3), 1 thread, float32, best of 7: eval 8x512x7x7 45.5 -> 30.0 us.
inline __m256i first_lanes_32(std::int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline __m256i first_lanes_64(std::int64_t n) {
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
}
// The last n lanes (0 < n < lanes) set, for keep_last.
inline __m256i last_lanes_32(std::int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(int(7 - n)));
}
inline __m256i last_lanes_64(std::int64_t n) {
    return _mm256_cmpgt_epi64(_mm256_setr_epi64x(0, 1, 2, 3), _mm256_set1_epi64x(3 - n));
}

// Short planes read their partial last vector as the W values that end the plane, one plain
// load (kOverlapTails, kernel_bodies.inl): a VMASKMOVPS load costs AMD cores before Zen 4
// several cycles and a BLENDVPS, half storage goes through a buffer, and a block of 7x7 planes
// has one tail per 49 values. AMD EPYC (Zen 1), 1 thread, float32, the block kernels on
// 8x512x7x7: statistics sums 72.4 -> 54.1 us, backward sums 90.4 -> 68.2, gradient
// 79.3 -> 59.6, normalize 51.6 -> 46.1.

template <class T>
struct Ops;

template <>
struct Ops<double> {
    using V = __m256d;
    static constexpr std::int64_t W = 4;
    static constexpr bool kOverlapTails = true;
    static V zero() { return _mm256_setzero_pd(); }
    static V set1(double v) { return _mm256_set1_pd(v); }
    static V load(const double* p) { return _mm256_loadu_pd(p); }
    static V load_partial(const double* p, std::int64_t n, V fill) {
        const __m256i m = first_lanes_64(n);
        return _mm256_blendv_pd(fill, _mm256_maskload_pd(p, m), _mm256_castsi256_pd(m));
    }
    static void store(double* p, V v) { _mm256_storeu_pd(p, v); }
    // Non-temporal stores (Writes::streamed in table.hpp): p aligned to the vector's bytes.
    static void stream(double* p, V v) { _mm256_stream_pd(p, v); }
    static void fence() { _mm_sfence(); }
    // n doubles are 2n floats: the same bytes through Ops<float>'s plain stores (2n is even,
    // so only its 16- and 8-byte stores run).
    static void store_partial(double* p, V v, std::int64_t n);
    static V add(V a, V b) { return _mm256_add_pd(a, b); }
    static V sub(V a, V b) { return _mm256_sub_pd(a, b); }
    static V mul(V a, V b) { return _mm256_mul_pd(a, b); }
    static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
    static V div(V a, V b) { return _mm256_div_pd(a, b); }
    static V sqrt(V a) { return _mm256_sqrt_pd(a); }
    // Per-channel float32 values in float64 lanes (exact), and back rounded to nearest.
    static V load(const float* p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }
    static void store(float* p, V v) { _mm_storeu_ps(p, _mm256_cvtpd_ps(v)); }
    // Operands swapped: maxp[sd](b, a) = b > a ? b : a is exactly std::max(a, b) (the scalar
    // backend), so relu's max(v, 0) keeps a NaN v; maxp[sd](v, 0) would turn it into 0.
    static V max(V a, V b) { return _mm256_max_pd(b, a); }
    static V keep_last(V v, std::int64_t n) { return _mm256_and_pd(v, _mm256_castsi256_pd(last_lanes_64(n))); }
    static double sum_lanes(V v) {
        const __m128d pair = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
        return _mm_cvtsd_f64(_mm_add_sd(pair, _mm_unpackhi_pd(pair, pair)));
    }
    // Lane i: the sum of v[i]'s lanes, for W vectors.
    static V sum_each(const V* v) {
        const V a = _mm256_hadd_pd(v[0], v[1]), b = _mm256_hadd_pd(v[2], v[3]);  // pairs of elements
        return _mm256_add_pd(_mm256_permute2f128_pd(a, b, 0x20), _mm256_permute2f128_pd(a, b, 0x31));
    }
    static void add_lanes_to(double* dst, V v) { _mm256_storeu_pd(dst, _mm256_add_pd(_mm256_loadu_pd(dst), v)); }
    static void add_lanes_to_partial(double* dst, V v, std::int64_t n) {
        store_partial(dst, _mm256_add_pd(_mm256_maskload_pd(dst, first_lanes_64(n)), v), n);
    }
};

// Half storage (half.hpp): eight 16-bit values widen to a float vector and narrow back, rounding
// to nearest even (F16C for float16; integer shifts for bfloat16).
template <class H>
struct HalfConvert;

template <>
struct HalfConvert<float16> {
    static __m256 widen(__m128i bits) { return _mm256_cvtph_ps(bits); }
    static __m128i narrow(__m256 v) { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT); }
};

template <>
struct HalfConvert<bfloat16> {
    // Each value to the top half of its 32-bit lane, zeros below: one byte shuffle of the 16 bytes
    // copied to both halves of the vector (the copy is the load itself, VBROADCASTI128, where
    // the bits come from memory). Zero-extending and shifting took two operations, both on the
    // pipes that the narrowing's shifts and shuffles need. AMD EPYC Zen 3, one core: L1-resident
    // loops of 8192 values, three runs, eval apply 2504-3046 -> 2134-2835 ns, a deviation sum
    // 811-912 -> 662-801 ns; in the library (bench/cpp/ab_timing.cpp, bfloat16, both orders three
    // times, geometric mean of new / old) statistics 0.95-0.98 over 32x256x196, 256x1024,
    // 8x512x49 and 6272x256, the other calls 0.94-1.02, where the narrowing and memory dominate.
    static __m256 widen(__m128i bits) {
        const __m256i to_top = _mm256_setr_epi8(-1, -1, 0, 1, -1, -1, 2, 3, -1, -1, 4, 5, -1, -1, 6, 7,  //
                                                -1, -1, 8, 9, -1, -1, 10, 11, -1, -1, 12, 13, -1, -1, 14, 15);
        return _mm256_castsi256_ps(_mm256_shuffle_epi8(_mm256_broadcastsi128_si256(bits), to_top));
    }
    // half.hpp's float_to_bfloat, lane by lane: round to nearest even, NaN made quiet; the
    // bfloat16 is the top half of each lane. The NaN test is one unordered compare.
    static __m256i round(__m256 v) {
        const __m256i u = _mm256_castps_si256(v);
        const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        const __m256i rounded = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd));
        const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        const __m256i quiet = _mm256_or_si256(u, _mm256_set1_epi32(0x400000));
        return _mm256_blendv_epi8(rounded, quiet, nan);
    }
    // The halves pack as 128-bit vectors (no lane-crossing permute): on AMD cores before Zen 2 a
    // 256-bit integer op is two micro-ops, and narrowing is most of a bfloat16 apply's work there.
    static __m128i narrow(__m256 v) {
        const __m256i top = _mm256_srli_epi32(round(v), 16);
        return _mm_packus_epi32(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1));
    }
    // Sixteen values as two vectors, their even and odd elements: the bits of one 256-bit load
    // shifted up and masked; and back, the two rounded vectors' top halves blended into one store.
    // Per vector, in order, widening took a shuffle and narrowing a shift, an extract and a pack,
    // all on the two pipes of Zen 3 that shift and shuffle, as does rounding's shift: ten such
    // operations per sixteen values; in pairs five (the mask runs on any pipe).
    static void widen_pair(__m256i bits, __m256& even, __m256& odd) {
        even = _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16));
        odd = _mm256_castsi256_ps(_mm256_and_si256(bits, _mm256_set1_epi32(int(0xFFFF0000u))));
    }
    static __m256i narrow_pair(__m256 even, __m256 odd) {
        return _mm256_blend_epi16(_mm256_srli_epi32(round(even), 16), round(odd), 0xAA);
    }
};

template <>
struct Ops<float> {
    using V = __m256;
    static constexpr std::int64_t W = 8;
    static constexpr bool kOverlapTails = true;
    static V zero() { return _mm256_setzero_ps(); }
    static V set1(float v) { return _mm256_set1_ps(v); }
    static V load(const float* p) { return _mm256_loadu_ps(p); }
    static V load_partial(const float* p, std::int64_t n, V fill) {
        const __m256i m = first_lanes_32(n);
        return _mm256_blendv_ps(fill, _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m));
    }
    static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
    static void stream(float* p, V v) { _mm256_stream_ps(p, v); }
    static void fence() { _mm_sfence(); }
    static void store_partial(float* p, V v, std::int64_t n) {
        __m128 part = _mm256_castps256_ps128(v);
        if (n & 4) {
            _mm_storeu_ps(p, part);
            part = _mm256_extractf128_ps(v, 1);
            p += 4;
        }
        if (n & 2) {
            _mm_storel_pi(reinterpret_cast<__m64*>(p), part);
            part = _mm_movehl_ps(part, part);
            p += 2;
        }
        if (n & 1) _mm_store_ss(p, part);
    }
    // Half storage: Ops<float> is the compute type of float16 and bfloat16 (kernel_bodies.inl
    // loads and stores S through it). AVX2 has no 16-bit masked loads or stores, so a tail of n
    // values moves in pieces of 4, 2 and 1 (n's bits), as float's store_partial does: nothing
    // past p + n is touched. They went through a buffer and a memcpy call of n*2 bytes, and a
    // channels-last row of 20 columns, a tail in every row, took 3-5x float32's time. AMD EPYC
    // Zen 3, 1 thread, bench/cpp/ab_timing.cpp, bfloat16 100352x20, old -> new us: statistics
    // 1525 -> 223, eval 2022 -> 690, training 3576 -> 914, backward 5691 -> 1386 (float32: 370,
    // 507, 1035, 1338).
    template <class H>
    static V load(const H* p) { return HalfConvert<H>::widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
    template <class H>
    static V load_partial(const H* p, std::int64_t n, V fill) {
        __m128i bits = _mm_setzero_si128();  // the pieces from the last, each shifted up past the next
        std::int64_t i = n;
        if (n & 1) bits = _mm_cvtsi32_si128(load_bits<std::uint16_t>(p + (i -= 1)));
        if (n & 2)
            bits = _mm_or_si128(_mm_slli_si128(bits, 4), _mm_cvtsi32_si128(load_bits<std::int32_t>(p + (i -= 2))));
        if (n & 4) bits = _mm_or_si128(_mm_slli_si128(bits, 8), _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
        return _mm256_blendv_ps(fill, HalfConvert<H>::widen(bits), _mm256_castsi256_ps(first_lanes_32(n)));
    }
    template <class H>
    static void store(H* p, V v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), HalfConvert<H>::narrow(v)); }
    template <class H>
    static void stream(H* p, V v) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), HalfConvert<H>::narrow(v)); }
    template <class H>
    static void store_partial(H* p, V v, std::int64_t n) {
        __m128i bits = HalfConvert<H>::narrow(v);
        if (n & 4) {
            _mm_storel_epi64(reinterpret_cast<__m128i*>(p), bits);
            bits = _mm_srli_si128(bits, 8);
            p += 4;
        }
        if (n & 2) {
            store_bits(p, std::int32_t(_mm_cvtsi128_si32(bits)));
            bits = _mm_srli_si128(bits, 4);
            p += 2;
        }
        if (n & 1) store_bits(p, std::uint16_t(_mm_cvtsi128_si32(bits)));
    }
    // bfloat16 in pairs (kernel_bodies.inl, pairs): 2W values, in the order HalfConvert's
    // widen_pair gives, for work whose factors are the same in every lane or in that order too.
    static void load_pair(const bfloat16* p, V& first, V& second) {
        HalfConvert<bfloat16>::widen_pair(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), first, second);
    }
    static void store_pair(bfloat16* p, V first, V second) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), HalfConvert<bfloat16>::narrow_pair(first, second));
    }
    // p on a 32-byte boundary (a run's streamed part starts on a cache line, a row's pairs
    // 32 bytes apart from a row start on one)
    static void stream_pair(bfloat16* p, V first, V second) {
        _mm256_stream_si256(reinterpret_cast<__m256i*>(p), HalfConvert<bfloat16>::narrow_pair(first, second));
    }
    static V add(V a, V b) { return _mm256_add_ps(a, b); }
    static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
    static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
    static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
    static V max(V a, V b) { return _mm256_max_ps(b, a); }
    static V keep_last(V v, std::int64_t n) { return _mm256_and_ps(v, _mm256_castsi256_ps(last_lanes_32(n))); }
    static __m256d low(V v) { return _mm256_cvtps_pd(_mm256_castps256_ps128(v)); }
    static __m256d high(V v) { return _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)); }
    static double sum_lanes(V v) { return Ops<double>::sum_lanes(_mm256_add_pd(low(v), high(v))); }
    // In float32, unlike sum_lanes: the reductions count these adds against kFlushVectors.
    static V sum_each(const V* v) {
        V u[2];
        for (int i = 0; i < 2; ++i)  // each 128-bit half: v[4i .. 4i+3] over its four elements
            u[i] = _mm256_hadd_ps(_mm256_hadd_ps(v[4 * i], v[4 * i + 1]), _mm256_hadd_ps(v[4 * i + 2], v[4 * i + 3]));
        return _mm256_add_ps(_mm256_permute2f128_ps(u[0], u[1], 0x20), _mm256_permute2f128_ps(u[0], u[1], 0x31));
    }
    static void add_lanes_to(double* dst, V v) {
        _mm256_storeu_pd(dst, _mm256_add_pd(_mm256_loadu_pd(dst), low(v)));
        _mm256_storeu_pd(dst + 4, _mm256_add_pd(_mm256_loadu_pd(dst + 4), high(v)));
    }
    static void add_lanes_to_partial(double* dst, V v, std::int64_t n) {
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, v);
        for (std::int64_t i = 0; i < n; ++i) dst[i] += double(lanes[i]);
    }
};

inline void Ops<double>::store_partial(double* p, V v, std::int64_t n) {
    Ops<float>::store_partial(reinterpret_cast<float*>(p), _mm256_castpd_ps(v), 2 * n);
}

#include "kernel_bodies.inl"

template <class T>
const KernelTable<T>& table() {
    static const KernelTable<T> kernels = make_table<T>();
    return kernels;
}

}  // namespace batchnorm::detail::avx2

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

#endif  // x86-64
