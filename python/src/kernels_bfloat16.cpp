// The module's C++ entry points for bfloat16 storage, instantiated at -O3 (see instantiations.hpp).
#include "instantiations.hpp"

BATCHNORM_FOR_EACH_ENTRY_POINT_OF(, batchnorm::bfloat16, float)
