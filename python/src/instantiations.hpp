// The C++ entry points the module uses, for every storage type (float, double, float16,
// bfloat16; per-channel arrays are P = compute_t<T>). kernels_<type>.cpp instantiate them at
// -O3, one storage type per file; core.cpp (built at -O2, see CMakeLists.txt) only declares
// them, so no kernel is compiled at the bindings' level.
#pragma once

#include <batchnorm/batchnorm.hpp>

#define BATCHNORM_FOR_EACH_ENTRY_POINT(PREFIX, T, P)                                              \
    PREFIX template void batchnorm::batch_stats<T>(const T*, const batchnorm::Shape&, P*, P*);               \
    PREFIX template void batchnorm::forward_train<T>(const T*, T*, const batchnorm::Shape&, const P*,        \
                                                     const P*, P*, P*, double, double, P*, P*,    \
                                                     batchnorm::Activation);                      \
    PREFIX template void batchnorm::forward_eval<T>(const T*, T*, const batchnorm::Shape&, const P*,         \
                                                    const P*, const P*, const P*, double,         \
                                                    const T*, batchnorm::Activation);             \
    PREFIX template void batchnorm::backward<T>(const T*, const T*, T*, const batchnorm::Shape&, const P*,   \
                                                const P*, const P*, P*, P*, bool);                \
    PREFIX template void batchnorm::batch_moments<T>(const T*, const batchnorm::Shape&,                    \
                                                     batchnorm::GroupStats*);                      \
    PREFIX template void batchnorm::batch_norm_apply<T>(const T*, T*, const batchnorm::Shape&, const P*,   \
                                                        const P*, const P*, const P*);             \
    PREFIX template void batchnorm::batch_norm_backward_reduce<T>(const T*, const T*,                      \
                                                                  const batchnorm::Shape&, const P*, \
                                                                  double*, double*);               \
    PREFIX template void batchnorm::batch_norm_backward_apply<T>(const T*, const T*, T*,                   \
                                                                 const batchnorm::Shape&, const P*, \
                                                                 const P*, const P*, const double*, \
                                                                 const double*, double);

// The other normalizations, for the same storage types (T) and per-channel types (P).
#define BATCHNORM_FOR_EACH_NORM_ENTRY_POINT(PREFIX, T, P)                                         \
    PREFIX template void batchnorm::layer_norm<T>(const T*, T*, std::int64_t, std::int64_t, const P*,       \
                                                  const P*, double, P*, P*, const T*, T*);         \
    PREFIX template void batchnorm::layer_norm_backward<T>(const T*, const T*, T*, std::int64_t,            \
                                                           std::int64_t, const P*, const P*, const P*, \
                                                           P*, P*);                                \
    PREFIX template void batchnorm::rms_norm<T>(const T*, T*, std::int64_t, std::int64_t, const P*, double, \
                                                P*, const T*, T*);                                 \
    PREFIX template void batchnorm::rms_norm_backward<T>(const T*, const T*, T*, std::int64_t,              \
                                                         std::int64_t, const P*, const P*, P*);    \
    PREFIX template void batchnorm::group_norm<T>(const T*, T*, const batchnorm::GroupShape&, std::int64_t, \
                                                  const P*, const P*, double, P*, P*,              \
                                                  batchnorm::Activation);                          \
    PREFIX template void batchnorm::group_norm_backward<T>(const T*, const T*, T*,                         \
                                                           const batchnorm::GroupShape&, std::int64_t, \
                                                           const P*, const P*, const P*, P*, P*);  \
    PREFIX template void batchnorm::instance_norm<T>(const T*, T*, const batchnorm::GroupShape&, const P*, \
                                                     const P*, P*, P*, double, double, P*, P*,     \
                                                     batchnorm::Activation);

// Every entry point for one storage type.
#define BATCHNORM_FOR_EACH_ENTRY_POINT_OF(PREFIX, T, P)                                            \
    BATCHNORM_FOR_EACH_ENTRY_POINT(PREFIX, T, P)                                                  \
    BATCHNORM_FOR_EACH_NORM_ENTRY_POINT(PREFIX, T, P)

// Entry points over per-channel arrays alone, once per per-channel type P (float, double).
#define BATCHNORM_FOR_EACH_CHANNEL_ENTRY_POINT(PREFIX, P)                                          \
    PREFIX template void batchnorm::eval_invstd<P>(const P*, P*, std::int64_t, double);

BATCHNORM_FOR_EACH_CHANNEL_ENTRY_POINT(extern, float)
BATCHNORM_FOR_EACH_CHANNEL_ENTRY_POINT(extern, double)
BATCHNORM_FOR_EACH_ENTRY_POINT_OF(extern, float, float)
BATCHNORM_FOR_EACH_ENTRY_POINT_OF(extern, double, double)
BATCHNORM_FOR_EACH_ENTRY_POINT_OF(extern, batchnorm::float16, float)
BATCHNORM_FOR_EACH_ENTRY_POINT_OF(extern, batchnorm::bfloat16, float)
