// Instantiates the C++ entry points for the module, compiled at -O3 (see instantiations.hpp).
#include "instantiations.hpp"

BATCHNORM_FOR_EACH_ENTRY_POINT(, float)
BATCHNORM_FOR_EACH_ENTRY_POINT(, double)
