#!/usr/bin/env bash
# The C++ library as users get it: configure, build and ctest with GCC (ctest also builds and
# runs the example, examples/cpp, against an install of the build tree); the public headers
# checked for warnings with GCC and Clang (tests/cpp/header_warnings.cpp); install; then build
# and run the consumer project (tests/cpp/consumers) against
#   - the build tree         (-Dbatchnorm_DIR=<build>)
#   - an install tree        (-DCMAKE_PREFIX_PATH=<prefix>), also one configured without OpenMP
#   - the source tree        (add_subdirectory)
#   - the pip-installed wheel (-Dbatchnorm_DIR=$(python -m batchnorm --cmakedir)), and the
#     example too; skipped with a message when `import batchnorm` fails
# each in its own build directory under one temporary directory (removed on success, kept and
# printed on failure). Exits non-zero on the first failure. Installs nothing outside that
# directory. Needs cmake, g++, and ninja or make; GoogleTest (libgtest-dev) for the ctest suite.
# Environment: CXX (default g++), PYTHON (default python3), JOBS (default: nproc),
# BATCHNORM_CPP_KEEP=1 keeps the temporary directory.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
export CXX=${CXX:-g++}
python=${PYTHON:-python3}
jobs=${JOBS:-$(nproc 2>/dev/null || echo 2)}
work=$(mktemp -d "${TMPDIR:-/tmp}/batchnorm-cpp.XXXXXX")

finish() {
    local rc=$?
    if [[ $rc -ne 0 || "${BATCHNORM_CPP_KEEP:-0}" == 1 ]]; then
        echo "cpp.sh: build directories kept in $work" >&2
    else
        rm -rf "$work"
    fi
    [[ $rc -eq 0 ]] && echo "cpp.sh: all C++ checks passed" || echo "cpp.sh: FAILED" >&2
}
trap finish EXIT

step() { printf '\n=== cpp.sh: %s (%s)\n' "$*" "$(date +%T)"; }

for tool in cmake "$CXX"; do
    command -v "$tool" >/dev/null || { echo "cpp.sh: $tool not found" >&2; exit 2; }
done
if command -v ninja >/dev/null; then generator=(-G Ninja); else generator=(-G "Unix Makefiles"); fi
common=("${generator[@]}" -DCMAKE_BUILD_TYPE=Release "-DCMAKE_CXX_COMPILER=$CXX")

step "configure, build, ctest ($CXX, ${generator[1]}, $jobs jobs)"
cmake -S "$root" -B "$work/build" "${common[@]}" -DBATCHNORM_BUILD_TESTS=ON -DBATCHNORM_BUILD_BENCH=OFF
cmake --build "$work/build" --parallel "$jobs"
[[ -x "$work/build/tests/cpp/batchnorm_tests" ]] || {
    echo "cpp.sh: the GoogleTest suite was not built (GoogleTest missing? apt-get install libgtest-dev)" >&2
    exit 1
}
ctest --test-dir "$work/build" --output-on-failure --parallel "$jobs"

step "bench/cpp compiles (-fsyntax-only: its timing programs are not run here)"
for program in "$root"/bench/cpp/*.cpp; do
    "$CXX" -std=c++17 -fopenmp -fsyntax-only "-I$root/cpp/include" "$program"
done

step "public headers compile without warnings (tests/cpp/header_warnings.cpp, -fsyntax-only -Werror)"
warning_flags=(-std=c++17 -fopenmp -fsyntax-only -Wall -Wextra -Wpedantic -Wshadow -Wconversion -Werror)
for compiler in "$CXX" clang++; do
    command -v "$compiler" >/dev/null || { echo "cpp.sh: $compiler not found, its header check skipped"; continue; }
    "$compiler" "${warning_flags[@]}" "-I$root/cpp/include" "$root/tests/cpp/header_warnings.cpp"
done

step "install trees (with OpenMP, and configured without)"
cmake --install "$work/build" --prefix "$work/install"
cmake -S "$root" -B "$work/build-no-openmp" "${common[@]}" -DBATCHNORM_USE_OPENMP=OFF -DBATCHNORM_BUILD_TESTS=OFF
cmake --install "$work/build-no-openmp" --prefix "$work/install-no-openmp"

# project NAME SOURCE_DIR RUN_ARGS -- CMAKE_ARGS...: configure, build and run one project.
# Debug: these check how the package is found and linked, not the optimized code (ctest above
# ran that), and a Release build of each took a minute and more.
project() {
    local name=$1 src=$2 run=$3
    shift 4
    step "$name"
    cmake -S "$src" -B "$work/$name" "${generator[@]}" -DCMAKE_BUILD_TYPE=Debug "-DCMAKE_CXX_COMPILER=$CXX" "$@"
    cmake --build "$work/$name" --parallel "$jobs"
    local exe
    for exe in consumer batchnorm_pipeline; do
        if [[ -x "$work/$name/$exe" ]]; then
            # shellcheck disable=SC2086  # run holds the program's arguments
            "$work/$name/$exe" $run
            return
        fi
    done
    echo "cpp.sh: $name built no program" >&2
    return 1
}

consumers=$root/tests/cpp/consumers
example=$root/examples/cpp
project consumer-build-tree "$consumers/find_package" --openmp=on -- \
    "-Dbatchnorm_DIR=$work/build" "-DEXPECT_BATCHNORM_DIR=$work/build"
project consumer-install-tree "$consumers/find_package" --openmp=on -- \
    "-DCMAKE_PREFIX_PATH=$work/install" "-DEXPECT_BATCHNORM_DIR=$work/install/share/cmake/batchnorm"
project consumer-install-tree-no-openmp "$consumers/find_package" --openmp=off -- \
    "-DCMAKE_PREFIX_PATH=$work/install-no-openmp" \
    "-DEXPECT_BATCHNORM_DIR=$work/install-no-openmp/share/cmake/batchnorm"
project consumer-add-subdirectory "$consumers/add_subdirectory" --openmp=on -- "-DBATCHNORM_SOURCE_DIR=$root"
# The example against an install tree is ctest's example_cpp (above); here, against the wheel.

step "the pip-installed wheel"
if ! "$python" -c "import batchnorm" 2>/dev/null; then
    echo "cpp.sh: SKIPPED the wheel consumer: '$python -c \"import batchnorm\"' fails (pip install . first)"
    exit 0
fi
cmakedir=$("$python" -m batchnorm --cmakedir)
echo "cpp.sh: python -m batchnorm --cmakedir: $cmakedir"
if [[ ! -f "$cmakedir/batchnorm-config.cmake" ]]; then
    echo "cpp.sh: $cmakedir/batchnorm-config.cmake is missing: the installed wheel predates the" \
         "CMake package or was built without it; reinstall (pip install --no-build-isolation $root)" >&2
    exit 1
fi
includedir=$("$python" -m batchnorm --includedir)
[[ -f "$includedir/batchnorm/batchnorm.hpp" ]] || {
    echo "cpp.sh: python -m batchnorm --includedir: $includedir has no batchnorm/batchnorm.hpp" >&2
    exit 1
}
project consumer-wheel "$consumers/find_package" --openmp=on -- \
    "-Dbatchnorm_DIR=$cmakedir" "-DEXPECT_BATCHNORM_DIR=$cmakedir"
project example-wheel "$example" "" -- "-Dbatchnorm_DIR=$cmakedir"
