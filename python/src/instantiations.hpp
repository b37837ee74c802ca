// The C++ entry points the module uses, for float and double. kernels.cpp instantiates them at
// -O3; core.cpp (built at nanobind's -Os) only declares them, so no kernel is compiled at -Os.
#pragma once

#include <batchnorm/batchnorm.hpp>

#define BATCHNORM_FOR_EACH_ENTRY_POINT(PREFIX, T)                                                 \
    PREFIX template void batchnorm::batch_stats<T>(const T*, const batchnorm::Shape&, T*, T*);               \
    PREFIX template void batchnorm::forward_train<T>(const T*, T*, const batchnorm::Shape&, const T*,        \
                                                     const T*, T*, T*, double, double, T*, T*);   \
    PREFIX template void batchnorm::forward_eval<T>(const T*, T*, const batchnorm::Shape&, const T*,         \
                                                    const T*, const T*, const T*, double,         \
                                                    const T*, batchnorm::Activation);             \
    PREFIX template void batchnorm::backward<T>(const T*, const T*, T*, const batchnorm::Shape&, const T*,   \
                                                const T*, const T*, T*, T*, bool);                \
    PREFIX template void batchnorm::layer_norm<T>(const T*, T*, std::int64_t, std::int64_t, const T*,       \
                                                  const T*, double, T*, T*, const T*, T*);         \
    PREFIX template void batchnorm::layer_norm_backward<T>(const T*, const T*, T*, std::int64_t,            \
                                                           std::int64_t, const T*, const T*, const T*, \
                                                           T*, T*);                                \
    PREFIX template void batchnorm::rms_norm<T>(const T*, T*, std::int64_t, std::int64_t, const T*, double, \
                                                T*, const T*, T*);                                 \
    PREFIX template void batchnorm::rms_norm_backward<T>(const T*, const T*, T*, std::int64_t,              \
                                                         std::int64_t, const T*, const T*, T*);    \
    PREFIX template void batchnorm::group_norm<T>(const T*, T*, const batchnorm::GroupShape&, std::int64_t, \
                                                  const T*, const T*, double, T*, T*,              \
                                                  batchnorm::Activation);                          \
    PREFIX template void batchnorm::group_norm_backward<T>(const T*, const T*, T*,                         \
                                                           const batchnorm::GroupShape&, std::int64_t, \
                                                           const T*, const T*, const T*, T*, T*);  \
    PREFIX template void batchnorm::instance_norm<T>(const T*, T*, const batchnorm::GroupShape&, const T*, \
                                                     const T*, T*, T*, double, double, T*, T*,     \
                                                     batchnorm::Activation);                       \
    PREFIX template void batchnorm::batch_moments<T>(const T*, const batchnorm::Shape&,                    \
                                                     batchnorm::GroupStats*);                      \
    PREFIX template void batchnorm::batch_norm_apply<T>(const T*, T*, const batchnorm::Shape&, const T*,   \
                                                        const T*, const T*, const T*);             \
    PREFIX template void batchnorm::batch_norm_backward_reduce<T>(const T*, const T*,                      \
                                                                  const batchnorm::Shape&, const T*, \
                                                                  double*, double*);               \
    PREFIX template void batchnorm::batch_norm_backward_apply<T>(const T*, const T*, T*,                   \
                                                                 const batchnorm::Shape&, const T*, \
                                                                 const T*, const T*, const double*, \
                                                                 const double*, double);

BATCHNORM_FOR_EACH_ENTRY_POINT(extern, float)
BATCHNORM_FOR_EACH_ENTRY_POINT(extern, double)
