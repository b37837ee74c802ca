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
                                                const T*, const T*, T*, T*, bool);

BATCHNORM_FOR_EACH_ENTRY_POINT(extern, float)
BATCHNORM_FOR_EACH_ENTRY_POINT(extern, double)
