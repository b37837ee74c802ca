// The one registry of storage types: what an array element is in memory (S), the type the
// kernels compute in (compute_t<S>), its name in messages and its DLPack type code. A new
// storage type (half precision) is one specialization here plus a load/store pair per ISA.
#pragma once

#include <cstdint>
#include <type_traits>

namespace batchnorm {

// DLPack's type codes (dlpack.h, DLDataTypeCode).
enum class DLPackCode : std::uint8_t { int_ = 0, uint = 1, float_ = 2, bfloat = 4 };

template <class S>
struct StorageType;  // not a storage type: no specialization

template <>
struct StorageType<float> {
    using compute = float;
    static constexpr const char* name = "float32";
    static constexpr DLPackCode code = DLPackCode::float_;
    static constexpr int bits = 32;
};

template <>
struct StorageType<double> {
    using compute = double;
    static constexpr const char* name = "float64";
    static constexpr DLPackCode code = DLPackCode::float_;
    static constexpr int bits = 64;
};

template <class S>
using compute_t = typename StorageType<S>::compute;

template <class S, class = void>
struct is_storage_type : std::false_type {};
template <class S>
struct is_storage_type<S, std::void_t<typename StorageType<S>::compute>> : std::true_type {};

}  // namespace batchnorm
