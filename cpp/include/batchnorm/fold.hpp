// batchnorm::fold: merge an eval-mode batch norm into the convolution or linear layer before it.
//
//   // conv: weight (C_out, C_in, kh, kw), bias (C_out); bn over C_out channels
//   batchnorm::fold(bn_mean, bn_var, bn_weight, bn_bias, C_out, eps,
//                   conv_weight, conv_bias, C_in * kh * kw, folded_weight, folded_bias);
//   // now conv'(x) = conv(x) with folded_weight, folded_bias equals bn(conv(x)) in eval mode
//
// With alpha = bn_weight / sqrt(var + eps) per output channel c:
//   folded_weight[c, j] = weight[c, j] * alpha[c]
//   folded_bias[c]      = (bias[c] - mean[c]) * alpha[c] + bn_bias[c]
// computed in float64 and rounded once to T; torch.nn.utils.fusion.fuse_conv_bn_weights and
// the Python batchnorm.fold compute the same. The layer's weight has its output channels first,
// the rest of each channel's weights contiguous: C_out rows of `per_channel` values (Conv*d:
// C_in/groups*kh*kw...; Linear: in_features). A transposed convolution keeps its output
// channels on axis 1: transpose it first, or use the Python fold(axis=1).
#pragma once

#include <cstdint>
#include <string>

#include "errors.hpp"
#include "functional.hpp"
#include "layer.hpp"

namespace batchnorm {

// mean, var: the batch norm's running statistics (`channels` values); bn_weight null means 1,
// bn_bias null means 0. weight: `channels` x `per_channel` values; bias (`channels` values)
// null means a layer without bias (0). Writes folded_weight (`channels` x `per_channel`) and
// folded_bias (`channels`). Each output may be the same array as its input (in place), or must
// not overlap it. Throws invalid_argument, before writing anything, for negative sizes, eps not
// positive and finite, or a missing array.
// The layer's arrays are T (any storage type: a float16 conv stays float16); the batch norm's
// are compute_t<T>, as a BatchNorm<T> keeps them.
template <class T>
void fold(const compute_t<T>* mean, const compute_t<T>* var, const compute_t<T>* bn_weight,
          const compute_t<T>* bn_bias, std::int64_t channels,
          double eps, const T* weight, const detail::identity_t<T>* bias, std::int64_t per_channel,
          T* folded_weight, T* folded_bias) {
    detail::check_element_type<T>();
    detail::require(channels >= 0, "channels must be non-negative, got ", channels);
    detail::require(per_channel >= 0, "per_channel must be non-negative, got ", per_channel);
    detail::check_eps(eps);
    if (channels == 0) return;
    detail::check_pointer(mean, "mean");
    detail::check_pointer(var, "var");
    detail::check_pointer(folded_bias, "folded_bias");
    if (per_channel > 0) {
        detail::check_pointer(weight, "weight");
        detail::check_pointer(folded_weight, "folded_weight");
    }
    for (std::int64_t c = 0; c < channels; ++c) {
        const double alpha = detail::value_or(bn_weight, c, 1.0) * detail::invstd_of(double(var[c]), eps);
        const T* w = weight + c * per_channel;
        T* fw = folded_weight + c * per_channel;
        for (std::int64_t j = 0; j < per_channel; ++j) fw[j] = T(double(w[j]) * alpha);
        folded_bias[c] = T((detail::value_or(bias, c, 0.0) - double(mean[c])) * alpha +
                           detail::value_or(bn_bias, c, 0.0));
    }
}

// The same from a BatchNorm<T> layer, which must be in eval mode with running statistics
// (what Python's batchnorm.fold requires). channels = bn.num_features().
template <class T>
void fold(const BatchNorm<T>& bn, const T* weight, const detail::identity_t<T>* bias, std::int64_t per_channel,
          T* folded_weight, T* folded_bias) {
    detail::require(!bn.training(), "bn: fold needs an eval-mode batch norm (call eval() first)");
    detail::require(bn.track_running_stats(), "bn: fold needs running statistics (track_running_stats)");
    const std::size_t n = std::size_t(bn.num_features());
    detail::require(bn.running_mean.size() == n && bn.running_var.size() == n,
                    "bn: running_mean and running_var must have num_features values");
    detail::require(bn.weight.size() == (bn.affine() ? n : 0) && bn.bias.size() == (bn.affine() ? n : 0),
                    "bn: weight and bias must have num_features values (none when affine is false)");
    fold(bn.running_mean.data(), bn.running_var.data(), bn.weight.empty() ? nullptr : bn.weight.data(),
         bn.bias.empty() ? nullptr : bn.bias.data(), bn.num_features(), bn.eps(), weight, bias,
         per_channel, folded_weight, folded_bias);
}

}  // namespace batchnorm
