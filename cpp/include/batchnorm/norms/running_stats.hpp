// PyTorch's running-statistics rule, written once for every norm that keeps running statistics
// (BatchNorm, InstanceNorm with track_running_stats):
//   running = (1 - factor) * running + factor * batch value, with the unbiased variance,
// where factor is momentum, or, with momentum unset (PyTorch's None), 1/num_batches_tracked
// counted after this batch: a cumulative average.
#pragma once

#include <cstdint>
#include <optional>

namespace batchnorm {

inline double running_factor(std::optional<double> momentum, std::int64_t batches_tracked_after) {
    return momentum ? *momentum : 1.0 / double(batches_tracked_after);
}

namespace detail {

template <class T>
void update_running(T& running_mean, T& running_var, double mean, double unbiased_var, double factor) {
    const double keep = 1.0 - factor;
    running_mean = T(keep * double(running_mean) + factor * mean);
    running_var = T(keep * double(running_var) + factor * unbiased_var);
}

}  // namespace detail
}  // namespace batchnorm
