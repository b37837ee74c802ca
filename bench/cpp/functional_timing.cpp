// Times the C++ API on one shape, beside a memcpy of the same bytes: batch_stats,
// forward_eval, forward_train and backward (float32, random data), each the median of 41
// samples. Built against a checkout's headers, it compares two commits without Python in the
// way (the Python bench cannot load two builds in one process):
//
//   g++ -std=c++17 -O2 -fopenmp -Icpp/include bench/cpp/functional_timing.cpp -o /tmp/timing_new
//   git worktree add /tmp/base <rev>
//   g++ -std=c++17 -O2 -fopenmp -I/tmp/base/cpp/include bench/cpp/functional_timing.cpp -o /tmp/timing_old
//   for i in 1 2 3 4 5; do /tmp/timing_old 32 256 49; /tmp/timing_new 32 256 49; done
//
// Arguments: outer channels inner [threads] (a shape (outer, C, inner): N, C, H*W for NCHW).
// Alternate the builds and compare the best of several runs: on a shared machine one run's
// median can be off by tens of percent.
#include <batchnorm/batchnorm.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

namespace {

template <class F>
double median_us(F&& f, long calls) {
    std::vector<double> t;
    for (int s = 0; s < 41; ++s) {
        const auto start = std::chrono::steady_clock::now();
        for (long i = 0; i < calls; ++i) f();
        t.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count() / double(calls));
    }
    std::nth_element(t.begin(), t.begin() + 20, t.end());
    return t[20];
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 4) {
        std::fprintf(stderr, "usage: %s outer channels inner [threads]\n", argv[0]);
        return 2;
    }
    const long outer = std::atol(argv[1]), channels = std::atol(argv[2]), inner = std::atol(argv[3]);
    batchnorm::set_num_threads(argc > 4 ? std::atoi(argv[4]) : 1);
    const batchnorm::Shape s{outer, channels, inner};
    const std::size_t n = std::size_t(outer * channels * inner), c = std::size_t(channels);
    std::vector<float> x(n), y(n), dy(n), gx(n), w(c, 1.5f), b(c, 0.5f), rm(c), rv(c, 1.f), mean(c), invstd(c),
        gw(c), gb(c);
    std::mt19937 rng(0);
    std::normal_distribution<float> normal(3.f, 2.f);
    for (std::size_t i = 0; i < n; ++i) {
        x[i] = normal(rng);
        dy[i] = normal(rng) - 3.f;
    }
    const long calls = std::max(1L, 20000000L / long(n));  // ~20 M values per sample
    const double copy = median_us([&] { std::memcpy(y.data(), x.data(), n * sizeof(float)); }, calls);
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
    std::printf("%ldx%ldx%ld float32, %d thread(s): copy %.1f us | stats %.1f | eval %.1f | train %.1f | backward %.1f us"
                " | as multiples of the copy: %.2f %.2f %.2f %.2f\n",
                outer, channels, inner, batchnorm::get_num_threads(), copy, stats, eval, train, backward, stats / copy,
                eval / copy, train / copy, backward / copy);
    return 0;
}
