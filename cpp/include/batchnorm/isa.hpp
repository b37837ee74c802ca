// Which instruction set the kernels use. Chosen once per process: the best backend that this
// build contains and this CPU and OS can run, unless BATCHNORM_ISA names one
// (scalar | avx2 | avx512 | avx512_bf16 | neon), which is then used or refused with unsupported_isa.
// avx512_bf16 is avx512 plus AVX512-BF16, whose instruction narrows float32 to bfloat16.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "errors.hpp"

#if defined(__x86_64__) || defined(_M_X64)
#if defined(_MSC_VER) && !defined(__clang__)
#include <intrin.h>
#else
#include <cpuid.h>
#endif
#endif

namespace batchnorm {

enum class Isa { scalar, avx2, avx512, neon, avx512_bf16 };

inline const char* isa_name(Isa isa) {
    switch (isa) {
        case Isa::avx512_bf16: return "avx512_bf16";
        case Isa::avx512: return "avx512";
        case Isa::avx2: return "avx2";
        case Isa::neon: return "neon";
        default: return "scalar";
    }
}

namespace detail {

#if defined(__x86_64__) || defined(_M_X64)
struct CpuidRegisters {
    std::uint32_t eax = 0, ebx = 0, ecx = 0, edx = 0;
};

inline CpuidRegisters cpuid(std::uint32_t leaf, std::uint32_t subleaf) {
    CpuidRegisters r;
#if defined(_MSC_VER) && !defined(__clang__)
    int regs[4];
    __cpuidex(regs, int(leaf), int(subleaf));
    r = {std::uint32_t(regs[0]), std::uint32_t(regs[1]), std::uint32_t(regs[2]), std::uint32_t(regs[3])};
#else
    if (leaf > std::uint32_t(__get_cpuid_max(0, nullptr))) return r;
    __cpuid_count(leaf, subleaf, r.eax, r.ebx, r.ecx, r.edx);
#endif
    return r;
}

// XCR0: which register states the OS saves on a context switch. A CPU with AVX-512 under an
// OS (or hypervisor) that does not save ZMM state must not run AVX-512 code.
inline std::uint64_t xcr0() {
#if defined(_MSC_VER) && !defined(__clang__)
    return _xgetbv(0);
#else
    std::uint32_t lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (std::uint64_t(hi) << 32) | lo;
#endif
}

// AVX2, FMA and F16C (the float16 conversions of the half storage types); every CPU with AVX2
// has F16C, but a hypervisor may hide it.
inline bool cpu_has_avx2_fma() {
    const CpuidRegisters l1 = cpuid(1, 0);
    const bool osxsave = l1.ecx & (1u << 27), avx = l1.ecx & (1u << 28), fma = l1.ecx & (1u << 12);
    const bool f16c = l1.ecx & (1u << 29);
    if (!(osxsave && avx && fma && f16c)) return false;
    if ((xcr0() & 0x6) != 0x6) return false;  // XMM and YMM state
    return cpuid(7, 0).ebx & (1u << 5);
}

inline bool cpu_has_avx512() {
    if (!cpu_has_avx2_fma()) return false;
    if ((xcr0() & 0xE6) != 0xE6) return false;  // plus opmask, ZMM_Hi256, Hi16_ZMM state
    const std::uint32_t ebx = cpuid(7, 0).ebx;
    const std::uint32_t f = 1u << 16, dq = 1u << 17, bw = 1u << 30, vl = 1u << 31;
    return (ebx & (f | dq | bw | vl)) == (f | dq | bw | vl);
}

inline bool cpu_has_avx512_bf16() {
    return cpu_has_avx512() && (cpuid(7, 1).eax & (1u << 5));
}
#endif

// Backends this build contains and this machine can run, best first.
inline std::vector<Isa> supported_isas() {
    std::vector<Isa> isas;
#if defined(__x86_64__) || defined(_M_X64)
    if (cpu_has_avx512_bf16()) isas.push_back(Isa::avx512_bf16);
    if (cpu_has_avx512()) isas.push_back(Isa::avx512);
    if (cpu_has_avx2_fma()) isas.push_back(Isa::avx2);
#elif defined(__aarch64__)
    isas.push_back(Isa::neon);  // NEON is part of the aarch64 baseline
#endif
    isas.push_back(Isa::scalar);
    return isas;
}

// Every backend there is, by name: what BATCHNORM_ISA may say.
inline const std::vector<Isa>& every_isa() {
    static const std::vector<Isa> all{Isa::scalar, Isa::avx2, Isa::avx512, Isa::avx512_bf16, Isa::neon};
    return all;
}

inline std::string isa_names(const std::vector<Isa>& isas) {
    std::string names;
    for (Isa isa : isas) names += (names.empty() ? "" : ", ") + std::string(isa_name(isa));
    return names;
}

inline Isa select_isa() {
    const std::vector<Isa> supported = supported_isas();
    const char* forced = std::getenv("BATCHNORM_ISA");
    if (forced == nullptr || *forced == '\0') return supported.front();
    const std::string value = forced;
    for (Isa isa : supported)
        if (value == isa_name(isa)) return isa;
    bool known = false;
    for (Isa isa : every_isa()) known = known || value == isa_name(isa);
    throw unsupported_isa("BATCHNORM_ISA=" + value +
                          (known ? " is not supported by this CPU or build"
                                 : " is not a known backend (" + isa_names(every_isa()) + ")") +
                          "; supported here: " + isa_names(supported));
}

}  // namespace detail

// The backend in use, chosen on first call. Throws unsupported_isa if BATCHNORM_ISA forces a
// backend this machine cannot run (every later call throws the same).
inline Isa active_isa() {
    static const Isa isa = detail::select_isa();
    return isa;
}

inline std::vector<Isa> supported_isas() { return detail::supported_isas(); }

}  // namespace batchnorm
