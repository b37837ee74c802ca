// The one view every kernel sees: contiguous memory as (outer, channels, inner), with element
// (o, c, i) at o*channels*inner + c*inner + i. NCHW is (N, C, H*W); NHWC is (N*H*W, C, 1).
#pragma once

#include <cstdint>

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

inline void check_shape(const Shape& s) {
    require(s.outer >= 0 && s.channels >= 0 && s.inner >= 0,
            "shape: outer, channels and inner must be non-negative, got (", s.outer, ", ", s.channels, ", ",
            s.inner, ")");
}

}  // namespace detail
}  // namespace batchnorm
