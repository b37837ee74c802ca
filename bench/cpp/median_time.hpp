// The one timing rule of the bench's C++ programs: 41 samples of `calls` back-to-back calls,
// the median sample's microseconds per call (a median, so one disturbed sample moves nothing).
#pragma once

#include <algorithm>
#include <chrono>
#include <vector>

template <class F>
double median_us(F&& f, long calls) {
    std::vector<double> t;
    for (int s = 0; s < 41; ++s) {
        const auto start = std::chrono::steady_clock::now();
        for (long i = 0; i < calls; ++i) f();
        t.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count() /
                    double(calls));
    }
    std::nth_element(t.begin(), t.begin() + 20, t.end());
    return t[20];
}
