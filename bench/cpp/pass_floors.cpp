// What the passes of a batch-norm algorithm cost on this machine without any batch-norm work:
// plain contiguous loops over arrays of a shape's size (a read pass that sums x and x*x, the
// same over dy and x, an affine y = x * a + b, and y = dy * a + x * b + c), beside the memcpy
// that the bench's floor is. Their sums are what a two-pass training forward (statistics, then
// normalize) and a two-pass backward (the two sums, then grad_x) cost when each pass reads its
// inputs from wherever the arrays live: so for channels-last input (the statistics must see
// every row before any row is written) and for inputs whose arrays share one cache level
// anyway. They say which of the bench's targets such a shape can meet on this CPU. Channels-
// first inputs larger than the L2 can go below them: the second pass rereads a block of
// channels from the L2.
//
//   g++ -std=c++17 -O3 -march=native -fopenmp-simd bench/cpp/pass_floors.cpp -o /tmp/pass_floors
//   /tmp/pass_floors 8 512 49        # a shape's (outer, C, inner); only its size matters
//
// On x86 add -mprefer-vector-width=512 for AVX-512 loops (GCC picks 256 bits for -march=native
// on many AVX-512 CPUs). One thread; the median of 41 samples. The loops have no tails, no
// misalignment and no per-plane or per-channel work, but they are what the compiler makes of
// plain C++, not hand-tuned: a reference to measure kernels against, not a proven bound.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "median_time.hpp"

namespace {

volatile float sink;

}  // namespace

int main(int argc, char** argv) {
    if (argc < 4) {
        std::fprintf(stderr, "usage: %s outer channels inner\n", argv[0]);
        return 2;
    }
    const long n = std::atol(argv[1]) * std::atol(argv[2]) * std::atol(argv[3]);
    std::vector<float> x(std::size_t(n), 0.5f), dy(std::size_t(n), 0.25f), y(std::size_t(n), 0.0f);
    float *xp = x.data(), *dp = dy.data(), *yp = y.data();
    const long calls = std::max(1L, 20000000L / std::max(1L, n));
    const double copy = median_us([&] { std::memcpy(yp, xp, std::size_t(n) * sizeof(float)); }, calls);
    // Sums into 64 lanes (four AVX-512 or eight AVX2 registers): independent chains, so the
    // adds' latency does not bound the pass. n is a multiple of 64 or the tail is dropped.
    const auto sums = [&](const float* a, const float* b) {
        float s1[64] = {}, s2[64] = {};
        for (long i = 0; i + 64 <= n; i += 64) {
#pragma omp simd
            for (int k = 0; k < 64; ++k) {
                s1[k] += a[i + k];
                s2[k] += a[i + k] * b[i + k];
            }
        }
        float total = 0;
        for (int k = 0; k < 64; ++k) total += s1[k] + s2[k];
        sink = total;
    };
    const double read = median_us([&] { sums(xp, xp); }, calls);
    const double read2 = median_us([&] { sums(dp, xp); }, calls);
    const double affine = median_us([&] {
#pragma omp simd
        for (long i = 0; i < n; ++i) yp[i] = xp[i] * 1.5f + 0.5f;
    }, calls);
    const double affine2 = median_us([&] {
#pragma omp simd
        for (long i = 0; i < n; ++i) yp[i] = dp[i] * 1.5f + xp[i] * 0.5f + 0.25f;
    }, calls);
    std::printf("%s x %s x %s (%.2f MiB per array), 1 thread: memcpy %.1f us | read %.1f, two-input read %.1f, "
                "affine %.1f, two-input affine %.1f us\n",
                argv[1], argv[2], argv[3], double(n) * 4 / (1 << 20), copy, read, read2, affine, affine2);
    std::printf("two passes: train %.2fx memcpy, backward %.2fx\n", (read + affine) / copy,
                (read2 + affine2) / copy);
    return 0;
}
