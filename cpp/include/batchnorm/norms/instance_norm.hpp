// Instance normalization (PyTorch's InstanceNorm1d/2d/3d): group normalization with one group
// per channel, plus optional running statistics. As PyTorch, the running mean moves towards the
// mean over samples of the instance means, and the running variance towards the mean over
// samples of the unbiased instance variances (the rule of norms/running_stats.hpp).
#pragma once

#include <cstdint>
#include <vector>

#include "group_norm.hpp"
#include "running_stats.hpp"

namespace batchnorm {

// InstanceNorm forward with the instance statistics: y = act((x - mean)*invstd*weight + bias)
// per (sample, channel). running_mean/running_var (C values, both or neither) are updated with
// factor momentum. save_mean/save_invstd (optional, N*C values) receive the statistics; the
// backward is group_norm_backward with groups = channels. Needs more than one spatial value.
// T is the storage type of x and y; the per-channel arrays and statistics are compute_t<T>.
template <class T>
void instance_norm(const T* x, T* y, const GroupShape& shape, const compute_t<T>* weight, const compute_t<T>* bias,
                   compute_t<T>* running_mean, compute_t<T>* running_var, double momentum, double eps,
                   compute_t<T>* save_mean = nullptr, compute_t<T>* save_invstd = nullptr,
                   Activation act = Activation::none) {
    using P = compute_t<T>;
    detail::check_element_type<T>();
    detail::check_group_shape(shape, shape.channels > 0 ? shape.channels : 1);
    detail::check_eps(eps);
    detail::check_momentum(momentum);
    detail::require((running_mean == nullptr) == (running_var == nullptr),
                    "running_mean and running_var must be given together");
    detail::require(shape.spatial != 1, "Expected more than 1 spatial element when training, got input size (",
                    shape.batch, ", ", shape.channels, ", ", shape.spatial, ")");
    const std::int64_t C = shape.channels;
    if (shape.size() == 0) {  // nothing to normalize; without channels, no statistics either (N x 0)
        if (C > 0) group_norm(x, y, shape, C, weight, bias, eps, save_mean, save_invstd, act);
        return;
    }
    std::vector<double> means, vars;
    if (running_mean) {
        means.resize(std::size_t(shape.batch * C));
        vars.resize(means.size());
    }
    detail::check_pointer(x, "x");
    detail::check_pointer(y, "y");
    detail::normalize_groups(x, y, shape, C, weight, bias, act == Activation::relu,
                             [&](std::int64_t sg, const detail::Moments& m) {
                                 const double invstd = detail::invstd_of(m.biased_var(), eps);
                                 if (save_mean) save_mean[sg] = P(m.mean());
                                 if (save_invstd) save_invstd[sg] = P(invstd);
                                 if (running_mean) {
                                     means[std::size_t(sg)] = m.mean();
                                     vars[std::size_t(sg)] = m.unbiased_var();
                                 }
                                 return invstd;
                             });
    if (!running_mean) return;
    for (std::int64_t c = 0; c < C; ++c) {
        double mean = 0, var = 0;
        for (std::int64_t n = 0; n < shape.batch; ++n) {
            mean += means[std::size_t(n * C + c)];
            var += vars[std::size_t(n * C + c)];
        }
        detail::update_running(running_mean[c], running_var[c], mean / double(shape.batch),
                               var / double(shape.batch), momentum);
    }
}

}  // namespace batchnorm
