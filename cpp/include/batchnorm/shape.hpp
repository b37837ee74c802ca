// The one view every kernel sees: contiguous memory as (outer, channels, inner), with element
// (o, c, i) at o*channels*inner + c*inner + i. NCHW is (N, C, H*W); NHWC is (N*H*W, C, 1).
#pragma once

#include <cstdint>
#include <limits>
#include <vector>

#include "errors.hpp"

namespace batchnorm {

struct Shape {
    std::int64_t outer = 0;
    std::int64_t channels = 0;
    std::int64_t inner = 1;

    // Values that share one channel's statistics.
    std::int64_t per_channel() const { return outer * inner; }
    std::int64_t size() const { return outer * channels * inner; }
};

namespace detail {

// T, but not deducible: the entry points take T from their first array, so the others may be
// nullptr (which deduces nothing) without an explicit <T>.
template <class T>
struct identity {
    using type = T;
};
template <class T>
using identity_t = typename identity<T>::type;

// The most elements a shape may hold. Calls compute sizes and byte counts of several arrays of
// up to 8-byte values in int64; this bound keeps every such product far from overflow (and is
// far beyond any memory).
constexpr std::int64_t kMaxElements = std::numeric_limits<std::int64_t>::max() / 64;

// a * b <= limit, for non-negative a and b, without computing an overflowing product.
constexpr bool product_within(std::int64_t a, std::int64_t b, std::int64_t limit) {
    return a == 0 || b <= limit / a;
}

// Every entry point calls this first: afterwards per_channel(), size() and their byte counts
// cannot overflow.
inline void check_shape(const Shape& s) {
    require(s.outer >= 0 && s.channels >= 0 && s.inner >= 0,
            "shape: outer, channels and inner must be non-negative, got (", s.outer, ", ", s.channels, ", ",
            s.inner, ")");
    require(s.channels <= kMaxElements && product_within(s.outer, s.inner, kMaxElements) &&
                product_within(s.outer * s.inner, s.channels, kMaxElements),
            "shape: (", s.outer, ", ", s.channels, ", ", s.inner, ") has more than ", kMaxElements,
            " elements (or channels, or values per channel)");
}

// A count that sizes arrays (a layer's channels): within [0, kMaxElements], so that a huge or
// negative value is an invalid_argument here, not a std::length_error from a vector.
inline void check_count(const char* name, std::int64_t n) {
    require(n >= 0 && n <= kMaxElements, name, " must be between 0 and ", kMaxElements, ", got ", n);
}

// Values per row of a layer or RMS norm: the product of normalized_shape, whose dimensions
// are non-negative and whose product is at most kMaxElements.
inline std::int64_t normalized_size(const std::vector<std::int64_t>& normalized_shape) {
    std::int64_t size = 1;
    for (std::int64_t d : normalized_shape) {
        require(d >= 0, "normalized_shape: dimensions must be non-negative, got ", d);
        require(product_within(size, d, kMaxElements), "normalized_shape: more than ", kMaxElements, " values");
        size *= d;
    }
    return size;
}

}  // namespace detail
}  // namespace batchnorm
