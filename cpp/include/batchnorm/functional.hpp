// The C++ API: normalizations over raw pointers to contiguous memory seen as
// (outer, channels, inner) -- see shape.hpp. T is float or double. Per-channel arrays hold
// `channels` values. Optional pointers may be null. Outputs may alias their input (in place).
// Invalid arguments throw batchnorm::invalid_argument (a std::invalid_argument) before anything
// is written. One header per norm in norms/; stats.hpp has batch norm's phase functions
// (statistics out, normalize from given statistics) for distributed use.
#pragma once

#include "norms/batch_norm.hpp"
#include "stats.hpp"
