// Half-precision storage types: batchnorm::float16 (IEEE binary16) and batchnorm::bfloat16
// (the top half of a float32). Plain trivially-copyable structs holding the bits, so they need
// no compiler support and share their layout with NumPy's float16, ml_dtypes.bfloat16 and
// torch's half types. Kernels compute in float: the conversions here are the scalar reference
// (exact widening; narrowing rounds to nearest, ties to even, NaN stays NaN) that every vector
// backend's conversions match bit for bit.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace batchnorm {

namespace detail {

inline std::uint32_t float_bits(float f) {
    std::uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

inline float bits_float(std::uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

inline float half_to_float(std::uint16_t h) {
    const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
    const std::uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
    if (exp == 0x1F) return bits_float(sign | 0x7F800000u | (man << 13));  // inf, NaN (payload kept)
    if (exp != 0) return bits_float(sign | ((exp + 112) << 23) | (man << 13));
    // zero or subnormal: man * 2^-24, exact in float
    const float magnitude = float(man) * bits_float(0x33800000u);  // 2^-24
    return bits_float(sign | float_bits(magnitude));
}

inline std::uint16_t float_to_half(float f) {
    const std::uint32_t u = float_bits(f);
    const std::uint16_t sign = std::uint16_t((u >> 16) & 0x8000u);
    const std::uint32_t a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return std::uint16_t(sign | 0x7E00u | ((a >> 13) & 0x3FFu));  // quiet NaN
    if (a >= 0x477FF000u) return std::uint16_t(sign | 0x7C00u);  // rounds to >= 65536: inf
    if (a >= 0x38800000u) {                                       // normal half (>= 2^-14)
        const std::uint32_t rounded = a + 0xFFFu + ((a >> 13) & 1u) - (112u << 23);
        return std::uint16_t(sign | (rounded >> 13));
    }
    // Subnormal or zero: adding 0.5 makes the float adder round the value to a multiple of
    // 2^-24 (ties to even); the result's low mantissa bits are the half's.
    const float scaled = bits_float(a) + 0.5f;
    return std::uint16_t(sign | (float_bits(scaled) - 0x3F000000u));
}

inline float bfloat_to_float(std::uint16_t b) { return bits_float(std::uint32_t(b) << 16); }

inline std::uint16_t float_to_bfloat(float f) {
    const std::uint32_t u = float_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return std::uint16_t((u >> 16) | 0x40u);  // quiet NaN
    return std::uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// d rounded to float toward zero, with the last bit set when inexact (round to odd): a
// second rounding of that float to a half type then rounds d itself correctly, once.
inline float round_to_odd(double d) {
    float f = float(d);
    if (std::fabs(double(f)) > std::fabs(d)) f = std::nextafter(f, 0.0f);
    if (double(f) != d && d == d) f = bits_float(float_bits(f) | 1u);
    return f;
}

}  // namespace detail

// IEEE 754 binary16.
struct float16 {
    std::uint16_t bits;

    float16() = default;
    explicit float16(float f) : bits(detail::float_to_half(f)) {}
    explicit float16(double d) : float16(detail::round_to_odd(d)) {}  // rounded once, as NumPy does
    explicit operator float() const { return detail::half_to_float(bits); }
    explicit operator double() const { return double(float(*this)); }
    static float16 from_bits(std::uint16_t b) {
        float16 h;
        h.bits = b;
        return h;
    }
};

// bfloat16: float32's sign, exponent and top 7 mantissa bits.
struct bfloat16 {
    std::uint16_t bits;

    bfloat16() = default;
    explicit bfloat16(float f) : bits(detail::float_to_bfloat(f)) {}
    explicit bfloat16(double d) : bfloat16(detail::round_to_odd(d)) {}
    explicit operator float() const { return detail::bfloat_to_float(bits); }
    explicit operator double() const { return double(float(*this)); }
    static bfloat16 from_bits(std::uint16_t b) {
        bfloat16 h;
        h.bits = b;
        return h;
    }
};

}  // namespace batchnorm
