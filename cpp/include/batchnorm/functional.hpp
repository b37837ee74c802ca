// The C++ API: normalizations over raw pointers to contiguous memory. T is float or double.
// Optional pointers may be null. Outputs may alias their input (in place). Invalid arguments
// throw batchnorm::invalid_argument (a std::invalid_argument) before anything is written.
// One header per norm in norms/: batch_norm (memory seen as (outer, channels, inner), see
// shape.hpp), layer_norm, rms_norm, group_norm, instance_norm. stats.hpp has batch norm's
// phase functions (statistics out, normalize from given statistics) for distributed use.
#pragma once

#include "norms/batch_norm.hpp"
#include "norms/group_norm.hpp"
#include "norms/instance_norm.hpp"
#include "norms/layer_norm.hpp"
#include "norms/rms_norm.hpp"
#include "stats.hpp"
