// Times the C++ API on one shape, beside a memcpy of the same bytes: batch_stats,
// forward_eval, forward_train and backward (random data, float32 or a half type), each the median of 41
// samples. Built against a checkout's headers, it compares two commits without Python in the
// way (the Python bench cannot load two builds in one process):
//
//   g++ -std=c++17 -O2 -fopenmp -Icpp/include bench/cpp/functional_timing.cpp -o /tmp/timing_new
//   git worktree add /tmp/base <rev>
//   g++ -std=c++17 -O2 -fopenmp -I/tmp/base/cpp/include bench/cpp/functional_timing.cpp -o /tmp/timing_old
//   for i in 1 2 3 4 5; do /tmp/timing_old 32 256 49; /tmp/timing_new 32 256 49; done
//
// -O2 is what many C++ users build with; the Python extension's kernels are built at -O3, so
// build with -O3 to see what Python users get.
// Arguments: outer channels inner [threads [dtype]] (a shape (outer, C, inner): N, C, H*W for
// NCHW; dtype float32, float16 or bfloat16, the copy then of the half-size array).
// Alternate the builds and compare the best of several runs: on a shared machine one run's
// median can be off by tens of percent.
#include <batchnorm/batchnorm.hpp>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "median_time.hpp"

template <class T>
void run(const batchnorm::Shape& s, const char* dtype) {
    using P = batchnorm::compute_t<T>;  // parameters and statistics: float32 for every storage type
    const std::size_t n = std::size_t(s.size()), c = std::size_t(s.channels);
    std::vector<T> x(n), y(n), dy(n), gx(n);
    std::vector<P> w(c, P(1.5f)), b(c, P(0.5f)), rm(c), rv(c, P(1.f)), mean(c), invstd(c), gw(c), gb(c);
    std::mt19937 rng(0);
    std::normal_distribution<float> normal(3.f, 2.f);
    for (std::size_t i = 0; i < n; ++i) {
        x[i] = T(normal(rng));
        dy[i] = T(normal(rng) - 3.f);
    }
    const long calls = std::max(1L, 20000000L / long(n));  // ~20 M values per sample
    const double copy = median_us([&] { std::memcpy(y.data(), x.data(), n * sizeof(T)); }, calls);
    const double stats = median_us([&] { batchnorm::batch_stats(x.data(), s, mean.data(), invstd.data()); }, calls);
    const double eval = median_us(
        [&] { batchnorm::forward_eval(x.data(), y.data(), s, rm.data(), rv.data(), w.data(), b.data(), 1e-5); }, calls);
    const double train = median_us([&] {
        batchnorm::forward_train(x.data(), y.data(), s, w.data(), b.data(), rm.data(), rv.data(), 0.1, 1e-5,
                                 mean.data(), invstd.data());
    }, calls);
    const double backward = median_us([&] {
        batchnorm::backward(dy.data(), x.data(), gx.data(), s, mean.data(), invstd.data(), w.data(), gw.data(),
                            gb.data());
    }, calls);
    std::printf("%ldx%ldx%ld %s, %d thread(s): copy %.1f us | stats %.1f | eval %.1f | train %.1f | backward %.1f us"
                " | as multiples of the copy: %.2f %.2f %.2f %.2f\n",
                long(s.outer), long(s.channels), long(s.inner), dtype, batchnorm::get_num_threads(), copy, stats, eval,
                train, backward, stats / copy, eval / copy, train / copy, backward / copy);
}

int main(int argc, char** argv) {
    if (argc < 4) {
        std::fprintf(stderr, "usage: %s outer channels inner [threads [float32|float16|bfloat16]]\n", argv[0]);
        return 2;
    }
    const batchnorm::Shape s{std::atol(argv[1]), std::atol(argv[2]), std::atol(argv[3])};
    batchnorm::set_num_threads(argc > 4 ? std::atoi(argv[4]) : 1);
    const std::string dtype = argc > 5 ? argv[5] : "float32";
    if (dtype == "float32")
        run<float>(s, "float32");
    else if (dtype == "float16")
        run<batchnorm::float16>(s, "float16");
    else if (dtype == "bfloat16")
        run<batchnorm::bfloat16>(s, "bfloat16");
    else {
        std::fprintf(stderr, "dtype: expected float32, float16 or bfloat16, got %s\n", dtype.c_str());
        return 2;
    }
    return 0;
}
