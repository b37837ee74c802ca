// The module's C++ entry points for float storage, instantiated at -O3 (see instantiations.hpp).
#include "instantiations.hpp"

BATCHNORM_FOR_EACH_ENTRY_POINT_OF(, float, float)
BATCHNORM_FOR_EACH_CHANNEL_ENTRY_POINT(, float)
