// batchnorm: batch normalization for the CPU, header-only C++17.
//
//   #include <batchnorm/batchnorm.hpp>
//   batchnorm::Shape shape{N, C, H * W};                     // NCHW; NHWC is {N * H * W, C, 1}
//   batchnorm::forward_train(x, y, shape, weight, bias, running_mean, running_var,
//                            /*momentum=*/0.1, /*eps=*/1e-5, save_mean, save_invstd);
//   batchnorm::forward_eval(x, y, shape, running_mean, running_var, weight, bias, 1e-5);
//
// See functional.hpp for every operation, isa.hpp for backend selection (BATCHNORM_ISA) and
// threads.hpp for the thread count. Beyond the functions: inference.hpp (Inference<T>, eval
// with the per-channel factors computed once, residual + ReLU fusion), layer.hpp (BatchNorm<T>,
// the stateful layer with PyTorch's train/eval semantics) and fold.hpp (fold a batch norm into
// the preceding convolution or linear weights). The other normalizations: layer_norm, rms_norm,
// group_norm, instance_norm (functions in norms/, layer classes LayerNorm<T>, RMSNorm<T>,
// GroupNorm<T>, InstanceNorm<T> in layers/). docs/cpp.md has the whole C++ guide.
#pragma once

#include "errors.hpp"
#include "fold.hpp"
#include "functional.hpp"
#include "inference.hpp"
#include "dtype.hpp"
#include "isa.hpp"
#include "layer.hpp"
#include "layers/group_norm.hpp"
#include "layers/instance_norm.hpp"
#include "layers/layer_norm.hpp"
#include "layers/rms_norm.hpp"
#include "shape.hpp"
#include "stats.hpp"
#include "threads.hpp"
#include "version.hpp"
