// Maps the active ISA to its kernel table; the only place that knows every backend.
#pragma once

#include <type_traits>

#include "isa.hpp"
#include "kernels/avx2.hpp"
#include "kernels/avx512.hpp"
#include "kernels/neon.hpp"
#include "kernels/scalar.hpp"
#include "kernels/table.hpp"

namespace batchnorm::detail {

template <class T>
const KernelTable<T>& kernels_for(Isa isa) {
    switch (isa) {
#if defined(BATCHNORM_HAS_AVX512_BACKEND)
        case Isa::avx512_bf16:  // differs from avx512 only where it narrows to bfloat16
            if constexpr (std::is_same_v<T, bfloat16>) return avx512_bf16::table<T>();
            return avx512::table<T>();
        case Isa::avx512: return avx512::table<T>();
#endif
#if defined(BATCHNORM_HAS_AVX2_BACKEND)
        case Isa::avx2: return avx2::table<T>();
#endif
#if defined(BATCHNORM_HAS_NEON_BACKEND)
        case Isa::neon: return neon::table<T>();
#endif
        default: return scalar::table<T>();
    }
}

template <class T>
const KernelTable<T>& kernels() {
    static const KernelTable<T>& table = kernels_for<T>(active_isa());
    return table;
}

}  // namespace batchnorm::detail
