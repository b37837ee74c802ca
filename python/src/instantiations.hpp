// The C++ entry points the module uses, for every storage type (float, double, float16,
// bfloat16; per-channel arrays are P = compute_t<T>). kernels.cpp instantiates them at
// -O3; core.cpp (built at nanobind's -Os) only declares them, so no kernel is compiled at -Os.
#pragma once

#include <batchnorm/batchnorm.hpp>

#define BATCHNORM_FOR_EACH_ENTRY_POINT(PREFIX, T, P)                                              \
    PREFIX template void batchnorm::batch_stats<T>(const T*, const batchnorm::Shape&, P*, P*);               \
    PREFIX template void batchnorm::forward_train<T>(const T*, T*, const batchnorm::Shape&, const P*,        \
                                                     const P*, P*, P*, double, double, P*, P*);   \
    PREFIX template void batchnorm::forward_eval<T>(const T*, T*, const batchnorm::Shape&, const P*,         \
                                                    const P*, const P*, const P*, double,         \
                                                    const T*, batchnorm::Activation);             \
    PREFIX template void batchnorm::backward<T>(const T*, const T*, T*, const batchnorm::Shape&, const P*,   \
                                                const P*, const P*, P*, P*, bool);

BATCHNORM_FOR_EACH_ENTRY_POINT(extern, float, float)
BATCHNORM_FOR_EACH_ENTRY_POINT(extern, double, double)
BATCHNORM_FOR_EACH_ENTRY_POINT(extern, batchnorm::float16, float)
BATCHNORM_FOR_EACH_ENTRY_POINT(extern, batchnorm::bfloat16, float)
