# BATCHNORM_VERSION (e.g. 0.1.0) from cpp/include/batchnorm/version.hpp, the one place the
# version is written; included before project() so that project(VERSION) can use it.
file(STRINGS "${CMAKE_CURRENT_LIST_DIR}/../cpp/include/batchnorm/version.hpp" _batchnorm_version_lines
     REGEX "^#define BATCHNORM_VERSION_(MAJOR|MINOR|PATCH) [0-9]+$")
foreach(_part MAJOR MINOR PATCH)
  if(NOT _batchnorm_version_lines MATCHES "BATCHNORM_VERSION_${_part} ([0-9]+)")
    message(FATAL_ERROR "version.hpp: no BATCHNORM_VERSION_${_part}")
  endif()
  set(_batchnorm_${_part} "${CMAKE_MATCH_1}")
endforeach()
set(BATCHNORM_VERSION "${_batchnorm_MAJOR}.${_batchnorm_MINOR}.${_batchnorm_PATCH}")
unset(_batchnorm_version_lines)
