// The machine's cache sizes, read once at run time: tile sizes follow the CPU at hand, not
// one that the constants were tuned on (a 1 MiB L2 on an AMD EPYC, 2 MiB on a Xeon, 4 MiB
// shared by a cluster of Arm cores). Linux reports them in sysfs for cpu0 (private levels
// per core); elsewhere, or when sysfs says nothing, the defaults below hold (small enough
// for any core this library targets).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>

#include "../kernels/table.hpp"  // Writes, BlockReads
#include "../shape.hpp"

namespace batchnorm::detail {

struct CacheSizes {
    std::int64_t l1d = std::int64_t(32) << 10;
    std::int64_t l2 = std::int64_t(1) << 20;
    std::int64_t l3 = std::int64_t(32) << 20;  // shared by a cluster of cores (an AMD CCX, an Intel socket)
};

// "48K", "1024K", "32M" -> bytes; 0 when unreadable.
inline std::int64_t read_cache_size(const std::string& path) {
    std::FILE* f = std::fopen(path.c_str(), "r");
    if (!f) return 0;
    long long value = 0;
    char unit = 0;
    const int got = std::fscanf(f, "%lld%c", &value, &unit);
    std::fclose(f);
    if (got < 1 || value <= 0) return 0;
    if (got == 2 && (unit == 'K' || unit == 'k')) return value << 10;
    if (got == 2 && (unit == 'M' || unit == 'm')) return value << 20;
    return value;
}

inline CacheSizes read_cache_sizes() {
    CacheSizes sizes;
#if defined(__linux__)
    for (int index = 0; index < 8; ++index) {
        const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
        std::FILE* f = std::fopen((dir + "level").c_str(), "r");
        if (!f) break;
        int level = 0;
        char type[16] = {};
        const bool ok = std::fscanf(f, "%d", &level) == 1;
        std::fclose(f);
        if (!ok) continue;
        if (std::FILE* t = std::fopen((dir + "type").c_str(), "r")) {
            if (std::fscanf(t, "%15s", type) != 1) type[0] = 0;
            std::fclose(t);
        }
        if (std::string(type) == "Instruction") continue;
        const std::int64_t bytes = read_cache_size(dir + "size");
        if (bytes <= 0) continue;
        if (level == 1) sizes.l1d = bytes;
        if (level == 2) sizes.l2 = bytes;
        if (level == 3) sizes.l3 = bytes;
    }
#endif
    return sizes;
}

inline const CacheSizes& cache_sizes() {
    static const CacheSizes sizes = read_cache_sizes();
    return sizes;
}

// Values per statistics tile: half the per-core L2, so that the two passes over a tile (and
// the normalize that follows when the tile is the whole channel) hit it.
template <class T>
std::int64_t tile_values() {
    return std::max<std::int64_t>(std::int64_t(64) << 10, cache_sizes().l2 / 2) / std::int64_t(sizeof(T));
}

// Whether channels-first passes prefetch the planes they stream a run ahead (plane blocks:
// a few rows ahead; long planes: the next one as they go): when the call's arrays (`arrays`
// of this shape: its inputs and outputs) pass half the L3, and at least this many per-core
// L2 sizes, they cannot have stayed in the L3 since they were last used, and each plane, a row
// apart from the last, starts with misses that the hardware prefetchers only catch up with
// later. Measured on an AMD EPYC (Zen 5, 1 MiB L2, 32 MiB L3), 1 thread, float32, training:
// 64x256x14x14 (26 MB) 1522 -> 788 us, 32x64x56x56 (51 MB) 2589 -> 2131 us; backward
// 32x256x14x14 and 128x256x7x7 (19 MB) 662 -> 527 and 1015 -> 571 us. Below, where the data
// come from the L3, it costs: training 32x256x14x14 and 128x256x7x7 (13 MB) 232 -> 277 and
// 282 -> 313 us, 4x64x56x56 (6 MB) 105 -> 117 us.
// Half the L3 and not 16 L2s alone: on a Zen 3 (512 KiB L2, 32 MiB L3) 16 L2s are 8 MiB, a
// quarter of the L3, and 13 MB training calls took the prefetching fused path (below, where
// the data sit in the L3, two passes are faster: plane_blocks.hpp, in_two_passes). AMD EPYC
// Zen 3, 1 thread, float32, bench/cpp/ab_timing.cpp, three runs of 11 interleaved rounds, 16
// L2s -> half the L3: training 32x256x14x14 537/848/822 -> 463/770/643 us, 128x256x7x7
// 887/966/885 -> 735/844/625, 32x64x28x28 729/622/719 -> 591/502/594; backward 16x256x14x14
// (9.6 MB) 483/483/479 -> 428/393/399.
// The L3 counts for at most kMaxSharedL3 bytes: sysfs gives a large Xeon's whole socket
// (480 MiB on the one in bench/results), which its many cores, and a VM's neighbours, share.
constexpr std::int64_t kPrefetchCacheShares = 16;
constexpr std::int64_t kMaxSharedL3 = std::int64_t(32) << 20;

inline std::int64_t cache_resident_bytes() {
    const CacheSizes& c = cache_sizes();
    return std::max(kPrefetchCacheShares * c.l2, std::min(c.l3, kMaxSharedL3) / 2);
}

template <class T>
bool prefetch_planes(const Shape& s, int arrays) {
    return arrays * s.size() * std::int64_t(sizeof(T)) > cache_resident_bytes();
}

// Where the reductions over blocks of short planes, and the channels-last ones, find the
// `reads` arrays they read of this shape, out of the call's `arrays` (inputs and outputs): see
// BlockReads (kernels/table.hpp).
template <class T>
BlockReads block_reads(const Shape& s, int reads, int arrays) {
    if (prefetch_planes<T>(s, arrays)) return BlockReads::prefetched;
    const bool resident = std::int64_t(reads) * s.size() * std::int64_t(sizeof(T)) <= cache_sizes().l2;
    return resident ? BlockReads::resident : BlockReads::streamed;
}

// How the apply kernels of a channels-first call write its output (Writes, kernels/table.hpp):
// `arrays` arrays of this shape (inputs and output) in runs of `run` values.
// Streamed (non-temporal stores) when the arrays pass half the L3: such an output cannot stay
// in the caches until the next layer reads it, and plain stores first read each of its lines
// from memory (oneDNN's batch normalization has non-temporal stores too). AMD EPYC
// Zen 4 (32 MiB L3), 1 thread, float32, bench/cpp/functional_timing.cpp with 64-byte aligned
// arrays, two alternating runs each, old -> new: 32x64x56x56 training 4105-4199 -> 2471-2789 us,
// eval 2528-2665 -> 1355-1650, backward 5374-5512 -> 3800-4095; 4x256x56x56 training
// 1500-1807 -> 795-891, backward 2493-2663 -> 1235-1478; 2x256x56x56 (6.4 MiB per array)
// backward 575-647 -> 428-436. Below the threshold streaming costs: eval of 2x256x56x56, whose
// output stays in the L3, 170 -> 274-288 us.
// Only runs of min_stream_run_bytes or more: a run's first and last partial lines take plain
// stores, and a short run is little else. Eight lines (once sixteen) take 14x14 and 12x12
// float32 planes and rows of 128-255 float32 values: AMD EPYC Zen 3, 1 thread,
// bench/cpp/ab_timing.cpp, 9-11 interleaved rounds, two runs in either order, 1024 -> 512, us:
// backward 32x256x14x14 1973 -> 1565, 1747 -> 1325 (and 1464 -> 1067, 1871 -> 1433 with the
// order swapped), 64x256x14x14 6736 -> 5864; training 64x256x14x14 4746 -> 3673 and
// 128x128x12x12 2211 -> 1456; layer norm of 65536 rows of 192 values 15387 -> 11330. Four
// lines (8x8 planes) went either way: training 256x256x8x8 lost in four runs of four.
// float16 and bfloat16 keep sixteen lines: at eight their streamed planes, converted plane by
// plane, went either way (bfloat16, same machine and method: 128x256x16x16 backward and eval
// faster in four runs of four, training slower in four; 128x256x20x20 training faster in four,
// eval slower in three).
template <class T>
constexpr std::int64_t min_stream_run_bytes() {
    return sizeof(T) < sizeof(float) ? 1024 : 512;
}

template <class T>
Writes output_writes(const Shape& s, int arrays, std::int64_t run) {
    const std::int64_t bytes = arrays * s.size() * std::int64_t(sizeof(T));
    if (2 * bytes > cache_sizes().l3 && run * std::int64_t(sizeof(T)) >= min_stream_run_bytes<T>())
        return Writes::streamed;
    return prefetch_planes<T>(s, arrays) ? Writes::prefetched : Writes::cached;
}

}  // namespace batchnorm::detail
