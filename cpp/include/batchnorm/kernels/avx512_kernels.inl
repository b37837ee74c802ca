// The AVX-512 kernels: lane operations, half conversions and the kernel bodies, compiled twice
// by avx512.hpp inside a target region and a namespace of its choice (avx512, avx512_bf16);
// BATCHNORM_AVX512_BF16 says whether the region has AVX512-BF16. Included only from there.

// kHalfTails: a tail (a vector's first n lanes) is loaded and stored as 256-bit halves, the
// masked part at most 256 bits wide. A masked 512-bit load whose masked-off lanes reach 60 bytes
// past the data cost about 3x as much as the rest of a short run on an AMD EPYC (Zen 5): the
// channels-first reduce over 7x7 planes took 1.5x as long with 512-bit masked tails as with
// 256-bit ones (the tail of every 49-value plane was the hottest instruction).
inline __mmask8 first_lanes_8(std::int64_t n) { return __mmask8((1u << n) - 1u); }

// Half storage: a tail of 16-bit values is at most 256 bits, one mask of 16 lanes.
inline __mmask16 first_lanes_16(std::int64_t n) { return __mmask16((1u << n) - 1u); }

// A tail is stored by a masked move (vmovups/vmovupd/vmovdqu16 with a mask), which suppresses
// faults on its masked-off bytes. GCC folds a masked store of a computed 256-bit value into the
// instruction computing it (vextractf64x4, vcvtps2ph, vpmovdw with a masked memory destination,
// all seen in the release build); vextract* does not suppress faults, so a tail ending just
// before an unmapped page crashed (the ASan build, where heap blocks end at page boundaries).
// Every tail store takes its value through in_register(): the empty asm makes it a register
// operand, which the masked move can only store.
template <class V>
inline V in_register(V v) {
#if defined(__GNUC__)
    __asm__("" : "+v"(v));
#endif
    return v;
}

template <class T>
struct Ops;

template <>
struct Ops<double> {
    using V = __m512d;
    static constexpr std::int64_t W = 8;
    static constexpr bool kOverlapTails = false;  // masked loads and stores are native
    static V zero() { return _mm512_setzero_pd(); }
    static V set1(double v) { return _mm512_set1_pd(v); }
    static V load(const double* p) { return _mm512_loadu_pd(p); }
    // Tails in 256-bit halves (see kHalfTails): the whole low half, then the masked rest.
    static V load_partial(const double* p, std::int64_t n, V fill) {
        if (n > 4) return _mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_loadu_pd(p)), _mm256_mask_loadu_pd(_mm512_extractf64x4_pd(fill, 1), first_lanes_8(n - 4), p + 4), 1);
        return _mm512_insertf64x4(fill, _mm256_mask_loadu_pd(_mm512_castpd512_pd256(fill), first_lanes_8(n), p), 0);
    }
    static void store(double* p, V v) { _mm512_storeu_pd(p, v); }
    // Non-temporal stores (Writes::streamed in table.hpp): p aligned to the vector's bytes.
    static void stream(double* p, V v) { _mm512_stream_pd(p, v); }
    static void fence() { _mm_sfence(); }
    static void store_partial(double* p, V v, std::int64_t n) {
        if (n > 4) {
            _mm256_storeu_pd(p, _mm512_castpd512_pd256(v));
            _mm256_mask_storeu_pd(p + 4, first_lanes_8(n - 4), in_register(_mm512_extractf64x4_pd(v, 1)));
        } else {
            _mm256_mask_storeu_pd(p, first_lanes_8(n), in_register(_mm512_castpd512_pd256(v)));
        }
    }
    static V add(V a, V b) { return _mm512_add_pd(a, b); }
    static V sub(V a, V b) { return _mm512_sub_pd(a, b); }
    static V mul(V a, V b) { return _mm512_mul_pd(a, b); }
    static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
    static V div(V a, V b) { return _mm512_div_pd(a, b); }
    static V sqrt(V a) { return _mm512_sqrt_pd(a); }
    // Per-channel float32 values in float64 lanes (exact), and back rounded to nearest.
    static V load(const float* p) { return _mm512_cvtps_pd(_mm256_loadu_ps(p)); }
    static void store(float* p, V v) { _mm256_storeu_ps(p, _mm512_cvtpd_ps(v)); }
    // Operands swapped: maxp[sd](b, a) = b > a ? b : a is exactly std::max(a, b) (the scalar
    // backend), so relu's max(v, 0) keeps a NaN v; maxp[sd](v, 0) would turn it into 0.
    static V max(V a, V b) { return _mm512_max_pd(b, a); }
    static double sum_lanes(V v) { return _mm512_reduce_add_pd(v); }
    // Lane i: the sum of v[i]'s lanes, for W vectors (a transpose's shuffles beside the adds).
    static V sum_each(const V* v) {
        V t[4];
        for (int i = 0; i < 4; ++i)  // 128-bit block k of t[i]: {v[2i], v[2i+1]} over elements 2k, 2k+1
            t[i] = _mm512_add_pd(_mm512_unpacklo_pd(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_pd(v[2 * i], v[2 * i + 1]));
        // the blocks of each t[i] summed, t[i]'s landing in block i
        const V a = _mm512_add_pd(_mm512_shuffle_f64x2(t[0], t[1], 0x88), _mm512_shuffle_f64x2(t[0], t[1], 0xDD));
        const V b = _mm512_add_pd(_mm512_shuffle_f64x2(t[2], t[3], 0x88), _mm512_shuffle_f64x2(t[2], t[3], 0xDD));
        return _mm512_add_pd(_mm512_shuffle_f64x2(a, b, 0x88), _mm512_shuffle_f64x2(a, b, 0xDD));
    }
    static void add_lanes_to(double* dst, V v) { _mm512_storeu_pd(dst, _mm512_add_pd(_mm512_loadu_pd(dst), v)); }
    static void add_lanes_to_partial(double* dst, V v, std::int64_t n) {
        const __mmask8 m = first_lanes_8(n);
        _mm512_mask_storeu_pd(dst, m, _mm512_add_pd(_mm512_maskz_loadu_pd(m, dst), v));
    }
};

// Half storage (half.hpp): sixteen 16-bit values widen to a float vector and narrow back,
// rounding to nearest even (vcvtph2ps/vcvtps2ph for float16; integer shifts for bfloat16).
template <class H>
struct HalfConvert;

template <>
struct HalfConvert<float16> {
    static __m512 widen(__m256i bits) { return _mm512_cvtph_ps(bits); }
    static __m256i narrow(__m512 v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
};

template <>
struct HalfConvert<bfloat16> {
    static __m512 widen(__m256i bits) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16)); }
    // half.hpp's float_to_bfloat, lane by lane: round to nearest even, NaN made quiet.
    static __m256i narrow_by_shifts(__m512 v) {
        const __m512i u = _mm512_castps_si512(v);
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        const __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
        const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)),
                                                      _mm512_set1_epi32(0x7F800000));
        const __m512i chosen = _mm512_mask_or_epi32(rounded, nan, u, _mm512_set1_epi32(0x400000));
        return _mm512_cvtepi32_epi16(_mm512_srli_epi32(chosen, 16));
    }
#if BATCHNORM_AVX512_BF16
    // vcvtneps2bf16 rounds to nearest even and quiets NaN as the shifts do (every one of the
    // 2^32 floats checked), but flushes float32 denormal inputs to zero: a vector holding one
    // (1 in 2^8 of all bit patterns, hardly ever a normalized value) takes the shifts.
    static __m256i narrow(__m512 v) {
        if (_mm512_fpclass_ps_mask(v, 0x20) != 0) return narrow_by_shifts(v);  // 0x20: denormal
        return (__m256i)_mm512_cvtneps_pbh(v);
    }
#else
    static __m256i narrow(__m512 v) { return narrow_by_shifts(v); }
#endif
};

template <>
struct Ops<float> {
    using V = __m512;
    static constexpr std::int64_t W = 16;
    static constexpr bool kOverlapTails = false;
    static V zero() { return _mm512_setzero_ps(); }
    static V set1(float v) { return _mm512_set1_ps(v); }
    static V load(const float* p) { return _mm512_loadu_ps(p); }
    // Tails in 256-bit halves (see kHalfTails): the whole low half, then the masked rest.
    static V load_partial(const float* p, std::int64_t n, V fill) {
        if (n > 8) return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(p)), _mm256_mask_loadu_ps(high_half(fill), first_lanes_8(n - 8), p + 8), 1);
        return _mm512_insertf32x8(fill, _mm256_mask_loadu_ps(_mm512_castps512_ps256(fill), first_lanes_8(n), p), 0);
    }
    static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
    static void stream(float* p, V v) { _mm512_stream_ps(p, v); }
    static void fence() { _mm_sfence(); }
    static void store_partial(float* p, V v, std::int64_t n) {
        if (n > 8) {
            _mm256_storeu_ps(p, _mm512_castps512_ps256(v));
            _mm256_mask_storeu_ps(p + 8, first_lanes_8(n - 8), in_register(high_half(v)));
        } else {
            _mm256_mask_storeu_ps(p, first_lanes_8(n), in_register(_mm512_castps512_ps256(v)));
        }
    }
    static __m256 high_half(V v) { return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)); }
    // Half storage: Ops<float> is the compute type of float16 and bfloat16 (kernel_bodies.inl
    // loads and stores S through it); tails by mask.
    template <class H>
    static V load(const H* p) { return HalfConvert<H>::widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
    template <class H>
    static V load_partial(const H* p, std::int64_t n, V fill) {
        const __mmask16 m = first_lanes_16(n);
        return _mm512_mask_blend_ps(m, fill, HalfConvert<H>::widen(_mm256_maskz_loadu_epi16(m, p)));
    }
    template <class H>
    static void store(H* p, V v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), HalfConvert<H>::narrow(v)); }
    template <class H>
    static void stream(H* p, V v) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), HalfConvert<H>::narrow(v)); }
    template <class H>
    static void store_partial(H* p, V v, std::int64_t n) {
        _mm256_mask_storeu_epi16(p, first_lanes_16(n), in_register(HalfConvert<H>::narrow(v)));
    }
#if BATCHNORM_AVX512_BF16
    // A plane of kV vectors of bfloat16, the last with `last` lanes (kernel_bodies.inl:
    // stores_planes): one denormal test for the plane; a plane holding one goes by the shifts.
    template <int kV>
    static void store_plane(bfloat16* p, const V* v, std::int64_t last) {
        __m256i bits[kV];
        __mmask16 denormal = 0;
        for (int k = 0; k < kV; ++k) {
            denormal |= _mm512_fpclass_ps_mask(v[k], 0x20);
            bits[k] = (__m256i)_mm512_cvtneps_pbh(v[k]);
        }
        if (denormal)
            for (int k = 0; k < kV; ++k) bits[k] = HalfConvert<bfloat16>::narrow_by_shifts(v[k]);
        for (int k = 0; k < kV - 1; ++k) _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + k * W), bits[k]);
        if (last < W) _mm256_mask_storeu_epi16(p + (kV - 1) * W, first_lanes_16(last), in_register(bits[kV - 1]));
        else _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + (kV - 1) * W), bits[kV - 1]);
    }
#endif
    static V add(V a, V b) { return _mm512_add_ps(a, b); }
    static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
    static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
    static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
    static V max(V a, V b) { return _mm512_max_ps(b, a); }
    static __m512d low(V v) { return _mm512_cvtps_pd(_mm512_castps512_ps256(v)); }
    static __m512d high(V v) { return _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))); }
    static double sum_lanes(V v) { return _mm512_reduce_add_pd(_mm512_add_pd(low(v), high(v))); }
    // In float32, unlike sum_lanes: the reductions count these adds against kFlushVectors.
    static V sum_each(const V* v) {
        V t[8], u[4];
        for (int i = 0; i < 8; ++i)  // block k of t[i]: {v[2i], v[2i+1]} over elements 4k + {0, 2}, 4k + {1, 3}
            t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
        for (int i = 0; i < 4; ++i) {  // block k of u[i]: v[4i .. 4i+3] over elements 4k .. 4k+3
            const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
            u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
        }
        const V a = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
        const V b = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
        return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
    }
    static void add_lanes_to(double* dst, V v) {
        Ops<double>::add_lanes_to(dst, low(v));
        Ops<double>::add_lanes_to(dst + 8, high(v));
    }
    static void add_lanes_to_partial(double* dst, V v, std::int64_t n) {
        Ops<double>::add_lanes_to_partial(dst, low(v), std::min<std::int64_t>(n, 8));
        if (n > 8) Ops<double>::add_lanes_to_partial(dst + 8, high(v), n - 8);
    }
};

#include "kernel_bodies.inl"

template <class T>
const KernelTable<T>& table() {
    static const KernelTable<T> kernels = make_table<T>();
    return kernels;
}

