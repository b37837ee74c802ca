// The one registry of storage types: what an array element is in memory (S), the type the
// kernels compute in (compute_t<S>), its name in messages and its DLPack type code. A new
// storage type (half precision) is one specialization here plus a load/store pair per ISA.
#pragma once

#include <cstdint>
#include <type_traits>

#include "half.hpp"

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

// Half-precision storage: float math inside; weight, bias and statistics stay float (as in
// PyTorch, whose batch norm takes float32 parameters with bfloat16/float16 activations).
template <>
struct StorageType<float16> {
    using compute = float;
    static constexpr const char* name = "float16";
    static constexpr DLPackCode code = DLPackCode::float_;
    static constexpr int bits = 16;
};

template <>
struct StorageType<bfloat16> {
    using compute = float;
    static constexpr const char* name = "bfloat16";
    static constexpr DLPackCode code = DLPackCode::bfloat;
    static constexpr int bits = 16;
};

// The type of compute, and of every per-channel array (weight, bias, statistics).
template <class S>
using compute_t = typename StorageType<S>::compute;

template <class S, class = void>
struct is_storage_type : std::false_type {};
template <class S>
struct is_storage_type<S, std::void_t<typename StorageType<S>::compute>> : std::true_type {};

}  // namespace batchnorm
