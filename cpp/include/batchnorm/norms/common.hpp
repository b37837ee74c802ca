// Argument checks every norm shares. Each throws invalid_argument naming the argument.
#pragma once

#include <cmath>
#include <cstdint>

#include "../dtype.hpp"
#include "../errors.hpp"
#include "../shape.hpp"

namespace batchnorm::detail {

template <class T>
void check_element_type() {
    static_assert(is_storage_type<T>::value, "batchnorm supports float and double");
}

inline void check_eps(double eps) {
    require(std::isfinite(eps) && eps > 0, "eps must be a positive finite number, got ", eps);
}

inline void check_pointer(const void* p, const char* name) {
    require(p != nullptr, name, " must not be null");
}

// A per-channel array holds `channels` values: with none, null is an empty array (what an
// empty std::vector's data() gives).
inline void check_channel_pointer(const void* p, const char* name, std::int64_t channels) {
    require(p != nullptr || channels == 0, name, " must not be null");
}

inline void check_momentum(double momentum) {
    require(momentum >= 0 && momentum <= 1, "momentum must be in [0, 1], got ", momentum);
}

}  // namespace batchnorm::detail
