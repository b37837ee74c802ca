// Instantiates the C++ entry points for the module, compiled at -O3 (see instantiations.hpp).
#include "instantiations.hpp"

BATCHNORM_FOR_EACH_ENTRY_POINT(, float, float)
BATCHNORM_FOR_EACH_ENTRY_POINT(, double, double)
BATCHNORM_FOR_EACH_ENTRY_POINT(, batchnorm::float16, float)
BATCHNORM_FOR_EACH_ENTRY_POINT(, batchnorm::bfloat16, float)
BATCHNORM_FOR_EACH_NORM_ENTRY_POINT(, float, float)
BATCHNORM_FOR_EACH_NORM_ENTRY_POINT(, double, double)
BATCHNORM_FOR_EACH_NORM_ENTRY_POINT(, batchnorm::float16, float)
BATCHNORM_FOR_EACH_NORM_ENTRY_POINT(, batchnorm::bfloat16, float)
