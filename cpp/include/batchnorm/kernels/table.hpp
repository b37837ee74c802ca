// The kernel table: what every ISA backend provides, for one element type. The driver
// (ISA-neutral, OpenMP) calls only these. Two families:
//  - cf_*: channels-first. One channel's values come as `count` runs of `len` contiguous values,
//    `stride` apart (a run is one (n, c) plane of NCHW). Vectorized along the run. prefetch:
//    runs past kPrefetchMaxBytes prefetch the next run as they go, those the reductions read
//    (cf_dev, cf_dot), for data from beyond the core's caches; the apply kernels (cf_affine,
//    cf_grad) take Writes.
//  - rows_* and cl_*: row-major tiles of `rows` rows x `cols` contiguous columns, one column per
//    channel (channels-last), rows `ld` values apart (ld = cols for whole rows; more for a block
//    of columns). Vectorized across columns; per-column results add into float64.
//  - row_*: one row of n values with per-element weight and bias (layer norm); cols_dot: their
//    column sums over rows.
// Reductions accumulate in lanes of T that are flushed to float64 every few vectors, so a float32
// sum never grows long enough to lose the digits the accuracy targets need.
#pragma once

#include <array>        // std::array: used by kernel_bodies.inl
#include <cstdint>
#include <numeric>      // std::gcd: used by kernel_bodies.inl
#include <type_traits>  // std::integral_constant, std::void_t: used by kernel_bodies.inl
#include <utility>      // std::declval, used by kernel_bodies.inl
#include <vector>       // std::vector: with_pair_columns' factors in kernel_bodies.inl

#include "../dtype.hpp"
#include "../engine/affine.hpp"  // invstd_of, value_or: eval_factors' scalar tail
#include "../engine/moments.hpp"

// The per-run loops (run_dev, run_dot, ...) must inline into each kernel: out of line, their
// vector accumulators go through memory (about 1.5x slower on short planes). GCC stops inlining
// them once they have two callers, so this says it.
#if defined(_MSC_VER) && !defined(__clang__)
#define BATCHNORM_ALWAYS_INLINE __forceinline
#else
#define BATCHNORM_ALWAYS_INLINE inline __attribute__((always_inline))
#endif

// A loop over a plane's compile-time vector count, unrolled whole: left rolled (GCC at -O2),
// the plane-block kernels test the loop counter and the tail's branch on every vector
// (AMD EPYC, Zen 3, AVX2, -O2, best of 7: batch_stats 8x512x7x7 48.5 -> 35.6 us, training
// 82.1 -> 72.7 us). The Python extension's kernels, built at -O3, unroll it anyway.
#if defined(__clang__)
#define BATCHNORM_UNROLL_PLANE _Pragma("clang loop unroll(full)")
#elif defined(__GNUC__)
#define BATCHNORM_UNROLL_PLANE _Pragma("GCC unroll 16")
#else
#define BATCHNORM_UNROLL_PLANE
#endif

namespace batchnorm::detail {

// Lanes of T are flushed to float64 before any value in them has been through more than this
// many float32 additions. A sum of positive terms (the squares) that went through at most k
// roundings is off by at most k * 2^-24 of itself: 16 * 6e-8 < 1e-6, the variance target, at
// any scale, whatever the data. Each reduction counts its own adds against it (a chain of
// vectors, the tree that joins chains, the rows a plane's sums take before a flush): a flush
// costs a horizontal sum, and on short planes flushing once a row instead of once the budget
// was spent was a quarter of the statistics (32x256x14x14 float32, AMD EPYC Zen 4).
constexpr std::int64_t kFlushVectors = 16;

// Prefetches a run of len values, a line at a time (the kernels; the engine's loops that call
// a kernel a row). kWrite: for a run about to be written (the line comes in owned, ready for
// the store). A run to be read comes into the L2 only (locality 2: prefetcht1 on x86), not the
// L1: the L1 has few miss buffers, and prefetches into it held up the loads of the run being
// summed. AMD EPYC Zen 4, float32, bench/cpp/ab_timing.cpp, 1 thread: backward 32x256x14x14
// 642 -> 573 us, 64x256x14x14 2716 -> 2185, 32x64x56x56 7082 -> 5917, 4x256x56x56 2245 -> 1898;
// training of the last three -9 to -17 %; 2 threads: backward 32x64x56x56 4050 -> 2935. Shapes
// whose data stay in cache (no prefetch) did not move.
template <bool kWrite = false, class P>
BATCHNORM_ALWAYS_INLINE void prefetch_run(const P* p, std::int64_t len) {
#if defined(__GNUC__) || defined(__clang__)
    const char* c = reinterpret_cast<const char*>(p);
    for (std::int64_t b = 0; b < len * std::int64_t(sizeof(P)); b += 64)
        __builtin_prefetch(c + b, kWrite ? 1 : 0, kWrite ? 3 : 2);
#else
    (void)p;
    (void)len;
#endif
}

// Where a reduction over a block of short planes (pb_dev, pb_dot) finds its data. resident:
// in the core's L2 (the arrays it reads fit), so it takes the rows a flush's worth at a time
// and, plane by plane, sums down them with the plane's accumulators in registers. streamed:
// from the L3 or memory, row by row in memory order, one stream (the order above lost there:
// 128x256x7x7 float32 statistics 270 -> 335 us); prefetched: the same with software prefetch
// of the planes a few rows ahead (prefetch_planes in engine/cache.hpp).
// The channels-last reductions (cl_dev, cl_dot) take a few rows at a time, except that with
// prefetched they go row by row over rows of less than a page (reads_in_order in
// kernel_bodies.inl), leaving the prefetching to the hardware, which keeps up with one stream
// an array.
enum class BlockReads { resident, streamed, prefetched };

// How an apply kernel writes its output. cached: plain stores. prefetched: the same, with
// software prefetch (for writing) of the run or plane the kernel writes next, for outputs whose
// lines come from beyond the core's caches. streamed: non-temporal stores, which write whole
// cache lines to memory without first reading them in (and without filling the caches with an
// output too large to stay there): the whole cache lines of each run (end_of_lines), the run's
// first and last partial lines by plain stores; the kernel fences the stores before it returns, so
// the output is visible to every thread once the call's threads have joined (all but the row
// kernels, whose callers fence: KernelTable::fence).
enum class Writes { cached, prefetched, streamed };

// The values of a run of n at p before its first cache-line boundary, from where every whole
// vector is aligned as a non-temporal store needs it; all n for storage not aligned to its own
// type.
constexpr std::int64_t kLineBytes = 64;
template <class P>
inline std::int64_t values_before_line(const P* p, std::int64_t n) {
    const auto at = reinterpret_cast<std::uintptr_t>(p);
    if (at % sizeof(P) != 0) return n;
    const auto before = std::int64_t((kLineBytes - std::int64_t(at % kLineBytes)) % kLineBytes) / std::int64_t(sizeof(P));
    return before < n ? before : n;
}

// Where a run of n values whose first `head` come before its first line boundary
// (values_before_line) ends its whole cache lines: a kernel streams [head, end) and writes the
// rest, the run's last partial line, by plain stores. Streaming every whole vector, as the
// kernels did, streamed part of the last line of every run that ends mid-line, and the next run
// wrote the rest of that line by plain stores: 4-6x slower. AMD EPYC Zen 3, 1 thread, float32,
// the output 32 or 48 bytes past a line, whole vectors -> whole lines: layer norm (16000, 256)
// 11.1-13.8 -> 2.4-2.8 ms, batch norm eval of the same bytes as (2000, 8, 256) 9.5-9.6 ->
// 1.3-1.5 ms (the same calls with the output 0 to 16 bytes past a line took 2.8-4.3 and
// 1.4-1.8 ms before).
template <class P>
inline std::int64_t end_of_lines(std::int64_t head, std::int64_t n) {
    static_assert(kLineBytes % sizeof(P) == 0, "a line holds whole values");
    constexpr std::int64_t per_line = kLineBytes / std::int64_t(sizeof(P));
    return head + (n - head) / per_line * per_line;
}

// S is the storage type of the data (x, y, dy, gx, residual); T = compute_t<S> the type of
// scalars, per-column factors and per-element parameters (the same for float and double).
template <class S>
struct KernelTable {
    using i64 = std::int64_t;
    using T = compute_t<S>;
    // {sum(x - shift), sum((x - shift)^2)}
    Sums (*cf_dev)(const S* x, i64 count, i64 len, i64 stride, T shift, bool prefetch);
    // {sum(dy), sum(dy * (x - shift))}
    Sums (*cf_dot)(const S* dy, const S* x, i64 count, i64 len, i64 stride, T shift, bool prefetch);
    // y = act((x - shift) * alpha + beta), act relu or none
    void (*cf_affine)(const S* x, S* y, i64 count, i64 len, i64 stride, T shift, T alpha, T beta, bool relu,
                      Writes writes);
    // gx = dy * k + (x - shift) * m + q
    void (*cf_grad)(const S* dy, const S* x, S* gx, i64 count, i64 len, i64 stride, T shift, T k,
                    T m, T q, Writes writes);
    // Eval over whole planes in memory order: plane r has channel (first_channel + r) % channels.
    // y = act((x - shift[c]) * alpha[c] + beta[c] + residual), residual may be null.
    void (*rows_affine)(const S* x, const S* residual, S* y, i64 planes, i64 len, i64 first_channel,
                        i64 channels, const T* shift, const T* alpha, const T* beta, bool relu, Writes writes);

    // sum[j] += sum over rows of x[r][j]
    void (*cl_sum)(const S* x, i64 rows, i64 cols, i64 ld, double* sum);
    // s1[j] += sum(x - shift[j]), s2[j] += sum((x - shift[j])^2); reads: see BlockReads
    void (*cl_dev)(const S* x, i64 rows, i64 cols, i64 ld, const T* shift, double* s1, double* s2,
                   BlockReads reads);
    // sdy[j] += sum(dy), sdyx[j] += sum(dy * (x - shift[j])); reads: see BlockReads
    void (*cl_dot)(const S* dy, const S* x, i64 rows, i64 cols, i64 ld, const T* shift, double* sdy,
                   double* sdyx, BlockReads reads);
    // y = act((x - shift[j]) * alpha[j] + beta[j] + residual), residual may be null
    // (streamed: whole vectors by non-temporal stores where every row of y begins on a cache line)
    void (*cl_affine)(const S* x, const S* residual, S* y, i64 rows, i64 cols, i64 ld, const T* shift,
                      const T* alpha, const T* beta, bool relu, Writes writes);
    // gx = dy * k[j] + (x - shift[j]) * m[j] + q[j]
    void (*cl_grad)(const S* dy, const S* x, S* gx, i64 rows, i64 cols, i64 ld, const T* shift,
                    const T* k, const T* m, const T* q, Writes writes);

    // out = a + b
    void (*add)(const S* a, const S* b, S* out, i64 n);
    // y = ((x - shift) * scale + offset) * w + b, w and b per element (null: 1 and 0)
    void (*row_scale)(const S* x, S* y, i64 n, T shift, T scale, T offset, const T* w, const T* b, Writes writes);
    // {sum(dy * w), sum(dy * w * (x - shift))} (w null: 1)
    Sums (*row_wdot)(const S* dy, const S* x, const T* w, i64 n, T shift);
    // row_wdot's sums, and in the same read the row's terms of cols_dot's: lanes[j] += dy[j],
    // lanes[n + j] += dy[j] * (x[j] - shift) * scale, in T (2n values; the caller adds them into
    // float64 within kFlushVectors rows)
    Sums (*row_wdot_cols)(const S* dy, const S* x, const T* w, i64 n, T shift, T scale, T* lanes);
    // gx = dy * w * k + (x - shift) * m + q (w null: 1)
    void (*row_wgrad)(const S* dy, const S* x, const T* w, S* gx, i64 n, T shift, T k, T m, T q, Writes writes);
    // Orders the streamed stores of row_scale and row_wgrad, which leave them unfenced: their
    // callers write one row a call, and each thread calls fence after its last row (or block
    // of rows), before the threads join, not after every row (a fence waits for the row to
    // reach memory). Layer norm, float32, AMD EPYC Zen 3, 1 thread,
    // a fence per row -> one per thread: (16000, 256) 4690 -> 2839 us, (8192, 384) 2691 -> 1699,
    // (16384, 512) 6454 -> 5300 (bench/cpp/ab_timing.cpp timing layer_norm as its rows mode
    // does, 11 interleaved rounds).
    void (*fence)();
    // sdy[j] += sum(dy[r][j]), sdyx[j] += sum(dy[r][j] * (x[r][j] - shift[r]) * scale[r])
    void (*cols_dot)(const S* dy, const S* x, i64 rows, i64 cols, i64 ld, const T* shift, const T* scale,
                     double* sdy, double* sdyx);

    // pb_*: a block of `planes` consecutive channels of a channels-first input, plane j of row r
    // at r * stride + j * len, planes at most kFlushVectors vectors (of `lanes`) long. The apply
    // kernels (pb_affine, pb_grad) take Writes (prefetched: the planes a few rows ahead), the
    // reductions (pb_dev, pb_dot) BlockReads, where their data come from.
    // s1[j] += sum(x - shift[j]), s2[j] += sum((x - shift[j])^2)
    void (*pb_dev)(const S* x, i64 rows, i64 stride, i64 planes, i64 len, const T* shift, double* s1, double* s2,
                   BlockReads reads);
    // sdy[j] += sum(dy), sdyx[j] += sum(dy * (x - shift[j]))
    void (*pb_dot)(const S* dy, const S* x, i64 rows, i64 stride, i64 planes, i64 len, const T* shift,
                   double* sdy, double* sdyx, BlockReads reads);
    // y = act((x - shift[j]) * alpha[j] + beta[j]), act relu or none
    void (*pb_affine)(const S* x, S* y, i64 rows, i64 stride, i64 planes, i64 len, const T* shift, const T* alpha,
                      const T* beta, bool relu, Writes writes);
    // gx = dy * k[j] + (x - shift[j]) * m[j] + q[j]
    void (*pb_grad)(const S* dy, const S* x, S* gx, i64 rows, i64 stride, i64 planes, i64 len, const T* shift,
                    const T* k, const T* m, const T* q, Writes writes);
    // Eval factors from given statistics, in float64 lanes, the shift being the mean itself:
    // alpha = weight * (1 / sqrt(var + eps)), beta = bias - 0*alpha (weight, bias null: 1, 0).
    void (*eval_factors)(const T* var, const T* weight, const T* bias, i64 channels, double eps, T* alpha,
                         T* beta);
    // v[i] = 1 / sqrt(v[i] + eps), in float64 lanes (invstd_of's bits).
    void (*invstd)(double* v, i64 n, double eps);

    // Lanes of T in one vector of this backend.
    i64 lanes;
};

}  // namespace batchnorm::detail
