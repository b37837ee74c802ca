// The module's C++ entry points for double storage, instantiated at -O3 (see instantiations.hpp).
#include "instantiations.hpp"

BATCHNORM_FOR_EACH_ENTRY_POINT_OF(, double, double)
BATCHNORM_FOR_EACH_CHANNEL_ENTRY_POINT(, double)
