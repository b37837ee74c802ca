// batchnorm's version: the one place it is written. CMake's project version (cmake/version.cmake),
// the Python package's metadata (pyproject.toml, scikit-build-core's regex provider) and with it
// batchnorm.__version__ are read from these three lines.
#pragma once

#define BATCHNORM_VERSION_MAJOR 0
#define BATCHNORM_VERSION_MINOR 1
#define BATCHNORM_VERSION_PATCH 0
