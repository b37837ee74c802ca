// AVX-512 (F, DQ, BW, VL) backend (x86-64). Tails use lane masks, never a scalar epilogue.
// Compiled inside a target region; dispatch calls it only after CPUID and XGETBV (opmask and
// ZMM state enabled by the OS) confirm support. Two builds of the same kernels
// (avx512_kernels.inl): `avx512`, and `avx512_bf16` for CPUs with AVX512-BF16, whose own
// instruction narrows float32 to bfloat16 (about 9 integer operations per vector otherwise);
// dispatch takes the second for bfloat16 storage only, the tables of the other types being equal.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#define BATCHNORM_HAS_AVX512_BACKEND 1

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "table.hpp"

// GCC 12's own AVX-512 intrinsics trip -W(maybe-)uninitialized (_mm512_undefined_* operands).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,fma")
#endif
#define BATCHNORM_AVX512_BF16 0
namespace batchnorm::detail::avx512 {
#include "avx512_kernels.inl"
}  // namespace batchnorm::detail::avx512
#undef BATCHNORM_AVX512_BF16
#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma,avx512bf16"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,fma,avx512bf16")
#endif
#define BATCHNORM_AVX512_BF16 1
namespace batchnorm::detail::avx512_bf16 {
#include "avx512_kernels.inl"
}  // namespace batchnorm::detail::avx512_bf16
#undef BATCHNORM_AVX512_BF16
#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#endif  // x86-64
