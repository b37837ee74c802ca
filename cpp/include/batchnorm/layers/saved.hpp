// What a layer's forward keeps for its backward, shared by the normalization layers.
#pragma once

#include <optional>
#include <utility>
#include <vector>

#include "../errors.hpp"

namespace batchnorm::detail {

// Statistics of the last forward and the size of its input; why_not is set when that forward
// cannot be differentiated (in place: the input was overwritten).
template <class T, class Size>
struct Saved {
    Size size;
    std::vector<T> mean, invstd;
    const char* why_not = nullptr;
};

template <class T, class Size>
const Saved<T, Size>& saved_for_backward(const std::optional<Saved<T, Size>>& saved) {
    require(saved.has_value(), "backward needs a forward first: call forward on an input");
    require(saved->why_not == nullptr, saved->why_not ? saved->why_not : "");
    return *saved;
}

inline const char* in_place_reason(const void* x, const void* y, bool nonempty) {
    return nonempty && x == y ? "backward is impossible after an in-place forward (y == x): "
                                "the input it needs was overwritten by the output"
                              : nullptr;
}

template <class T>
void check_param(const std::vector<T>& v, std::size_t want, const char* name) {
    require(v.size() == want, name, " must have ", want, " values, got ", v.size());
}

template <class T>
const T* param_or_null(const std::vector<T>& v) {
    return v.empty() ? nullptr : v.data();
}

}  // namespace batchnorm::detail
