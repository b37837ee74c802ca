// Compares two checkouts' C++ API in one process: each checkout's headers are compiled into a
// shared library of their own (hidden symbols, so neither calls into the other's kernels), the
// driver loads both and times them on the same arrays, interleaved round by round:
//
//   git worktree add /tmp/base <rev>
//   lib="g++ -std=c++17 -O3 -fopenmp -fPIC -shared -fvisibility=hidden -fvisibility-inlines-hidden"
//   $lib -DBATCHNORM_AB_LIBRARY -I/tmp/base/cpp/include bench/cpp/ab_timing.cpp -o /tmp/ab_old.so
//   $lib -DBATCHNORM_AB_LIBRARY -Icpp/include bench/cpp/ab_timing.cpp -o /tmp/ab_new.so
//   g++ -std=c++17 -O2 -Icpp/include bench/cpp/ab_timing.cpp -o /tmp/ab_timing -ldl
//   OMP_NUM_THREADS=1 /tmp/ab_timing /tmp/ab_old.so /tmp/ab_new.so 256 1024 1
//
// Why not two processes (functional_timing.cpp run from two builds, alternately): a process's
// arrays land on different physical pages each run, and on a small L2 that moves a channels-last
// call by tens of percent (AMD EPYC, Zen 1: the same binary's eval of 256x1024 took 62 us in one
// run and 107 us in the next), more than most changes being measured.
// Compare at one thread (OMP_NUM_THREADS=1): at more, the second library's first look at the
// CPUs (cpu_load.hpp) finds the first one's pool still spinning, counts it as running tasks, and
// its calls stay on one thread for the whole (short) run, whichever build it is.
// Arguments: old.so new.so outer channels inner [rounds [rows]]; prints the median of the rounds
// (each ~4 M values of back-to-back calls) for a memcpy, batch_stats, forward_eval,
// forward_train and backward; with `rows`, for a memcpy, layer_norm, layer_norm_backward,
// rms_norm and rms_norm_backward over outer*channels rows of inner values (engine/rows.hpp):
//   OMP_NUM_THREADS=1 /tmp/ab_timing /tmp/ab_old.so /tmp/ab_new.so 16000 1 256 9 rows
// float32 data; for a half type, build the two libraries and the driver alike with
// -DBATCHNORM_AB_STORAGE=batchnorm::bfloat16 (or batchnorm::float16): per-channel arrays stay
// float32, and the copy is of the half-size array.
#include <batchnorm/batchnorm.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#ifndef BATCHNORM_AB_STORAGE
#define BATCHNORM_AB_STORAGE float
#endif
using Storage = BATCHNORM_AB_STORAGE;
#define BATCHNORM_AB_STRING(x) #x
#define BATCHNORM_AB_NAME(x) BATCHNORM_AB_STRING(x)
#define BATCHNORM_AB_STORAGE_NAME BATCHNORM_AB_NAME(BATCHNORM_AB_STORAGE)

enum Op { kCopy, kStats, kEval, kTrain, kBackward, kOps };
enum RowOp { kRowCopy, kLayerNorm, kLayerNormBackward, kRmsNorm, kRmsNormBackward, kRowOps };

struct Arrays {
    std::vector<Storage> x, y, dy, gx;
    std::vector<float> w, b, rm, rv, mean, invstd, gw, gb;
};

// Microseconds per call of `calls` back-to-back calls of op.
extern "C" __attribute__((visibility("default"))) double batchnorm_ab_time(int op, const batchnorm::Shape* s,
                                                                          Arrays* a, long calls) {
    const std::size_t bytes = sizeof(Storage) * std::size_t(s->size());
    const auto start = std::chrono::steady_clock::now();
    for (long i = 0; i < calls; ++i) switch (op) {
            case kCopy: std::memcpy(a->y.data(), a->x.data(), bytes); break;
            case kStats: batchnorm::batch_stats(a->x.data(), *s, a->mean.data(), a->invstd.data()); break;
            case kEval:
                batchnorm::forward_eval(a->x.data(), a->y.data(), *s, a->rm.data(), a->rv.data(), a->w.data(),
                                        a->b.data(), 1e-5);
                break;
            case kTrain:
                batchnorm::forward_train(a->x.data(), a->y.data(), *s, a->w.data(), a->b.data(), a->rm.data(),
                                         a->rv.data(), 0.1, 1e-5, a->mean.data(), a->invstd.data());
                break;
            case kBackward:
                batchnorm::backward(a->dy.data(), a->x.data(), a->gx.data(), *s, a->mean.data(), a->invstd.data(),
                                    a->w.data(), a->gw.data(), a->gb.data(), true);
                break;
        }
    return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count() / double(calls);
}

// The same for the row norms: s->outer * s->channels rows of s->inner values.
extern "C" __attribute__((visibility("default"))) double batchnorm_ab_time_rows(int op, const batchnorm::Shape* s,
                                                                               Arrays* a, long calls) {
    const std::int64_t rows = s->outer * s->channels, cols = s->inner;
    const std::size_t bytes = sizeof(Storage) * std::size_t(s->size());
    const auto start = std::chrono::steady_clock::now();
    for (long i = 0; i < calls; ++i) switch (op) {
            case kRowCopy: std::memcpy(a->y.data(), a->x.data(), bytes); break;
            case kLayerNorm:
                batchnorm::layer_norm(a->x.data(), a->y.data(), rows, cols, a->w.data(), a->b.data(), 1e-5,
                                      a->mean.data(), a->invstd.data());
                break;
            case kLayerNormBackward:
                batchnorm::layer_norm_backward(a->dy.data(), a->x.data(), a->gx.data(), rows, cols, a->mean.data(),
                                               a->invstd.data(), a->w.data(), a->gw.data(), a->gb.data());
                break;
            case kRmsNorm:  // rm holds its saved 1 / rms, as mean and invstd hold layer norm's
                batchnorm::rms_norm(a->x.data(), a->y.data(), rows, cols, a->w.data(), 1e-5, a->rm.data());
                break;
            case kRmsNormBackward:
                batchnorm::rms_norm_backward(a->dy.data(), a->x.data(), a->gx.data(), rows, cols, a->rm.data(),
                                             a->w.data(), a->gw.data());
                break;
        }
    return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count() / double(calls);
}

#ifndef BATCHNORM_AB_LIBRARY
#include <dlfcn.h>

using TimeFn = double (*)(int, const batchnorm::Shape*, Arrays*, long);

int main(int argc, char** argv) {
    if (argc < 6) {
        std::fprintf(stderr, "usage: %s old.so new.so outer channels inner [rounds [rows]]\n", argv[0]);
        return 2;
    }
    const bool row_norms = argc > 7 && std::strcmp(argv[7], "rows") == 0;
    TimeFn time[2];
    for (int side = 0; side < 2; ++side) {
        void* lib = dlopen(argv[1 + side], RTLD_NOW | RTLD_LOCAL);
        time[side] = lib ? reinterpret_cast<TimeFn>(dlsym(lib, row_norms ? "batchnorm_ab_time_rows" : "batchnorm_ab_time"))
                         : nullptr;
        if (!time[side]) {
            std::fprintf(stderr, "%s: %s\n", argv[1 + side], dlerror());
            return 2;
        }
    }
    const batchnorm::Shape s{std::atol(argv[3]), std::atol(argv[4]), std::atol(argv[5])};
    const int rounds = argc > 6 ? std::atoi(argv[6]) : 15;
    // Per-channel arrays, or per-row ones (statistics) and per-column ones (weights) for rows.
    const std::size_t n = std::size_t(s.size()),
                      c = row_norms ? std::size_t(std::max(s.outer * s.channels, s.inner)) : std::size_t(s.channels);
    Arrays a{std::vector<Storage>(n), std::vector<Storage>(n), std::vector<Storage>(n), std::vector<Storage>(n),
             std::vector<float>(c, 1.5f), std::vector<float>(c, 0.5f), std::vector<float>(c),
             std::vector<float>(c, 1.f), std::vector<float>(c), std::vector<float>(c), std::vector<float>(c),
             std::vector<float>(c)};
    std::mt19937 rng(0);
    std::normal_distribution<float> normal(3.f, 2.f);
    for (std::size_t i = 0; i < n; ++i) {
        a.x[i] = Storage(normal(rng));
        a.dy[i] = Storage(normal(rng) - 3.f);
    }
    const long calls = std::max(1L, 4000000L / long(std::max<std::size_t>(n, 1)));
    static_assert(int(kOps) == int(kRowOps), "one loop times either set");
    const char* batch_names[kOps] = {"copy", "stats", "eval", "train", "backward"};
    const char* row_names[kRowOps] = {"copy", "layer_norm", "layer_norm_backward", "rms_norm", "rms_norm_backward"};
    const char* const* names = row_norms ? row_names : batch_names;
    std::printf("%ldx%ldx%ld %s, old -> new us:", long(s.outer), long(s.channels), long(s.inner),
                BATCHNORM_AB_STORAGE_NAME);
    for (int op = 0; op < kOps; ++op) {
        std::vector<double> t[2];
        for (int r = 0; r < rounds; ++r)
            for (int side = 0; side < 2; ++side) {
                time[side](op, &s, &a, 1);  // warm: the other side just ran
                t[side].push_back(time[side](op, &s, &a, calls));
            }
        for (auto& v : t) std::nth_element(v.begin(), v.begin() + rounds / 2, v.end());
        std::printf("  %s %.1f -> %.1f", names[op], t[0][std::size_t(rounds / 2)], t[1][std::size_t(rounds / 2)]);
    }
    std::printf("  (medians of %d interleaved rounds)\n", rounds);
}
#endif
