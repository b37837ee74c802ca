#!/usr/bin/env bash
# Builds the Python extension in other configurations, each into its own directory, and runs
# the test suite against it (PYTHONPATH puts the variant before the installed package):
#   clang     Clang instead of GCC (OpenMP from libomp)          whole suite
#   no-openmp BATCHNORM_USE_OPENMP=OFF: the serial build, -O1     whole suite
#   sanitize  GCC with -fsanitize=address,undefined, -O1          whole suite, torch-free (see below)
# The -O1 builds are CMake's Debug configuration (no -O3 for the kernels, asserts on) with -O1
# added: they test what the code computes, which the -O3 builds test for speed too, and compile
# in a fraction of the time.
# Usage: .ci/variants.sh [clang] [no-openmp] [sanitize]   (default: all three)
# Needs clang and libomp-dev for `clang`; nanobind, scikit-build-core and numpy installed.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
work=${VARIANTS_DIR:-build/variants}
mkdir -p "$work"

build() {  # build NAME [pip config settings...]: installs the variant into $work/NAME
    local name=$1; shift
    rm -rf "$work/$name"
    "$python" -m pip install -q --no-build-isolation --no-deps --target "$work/$name" \
        -Cbuild-dir="$work/$name-build" "$@" .
}

# A suite still running after 20 minutes is hung: interrupt it, so pytest says where it was.
pytest_run() { timeout --signal=INT --kill-after=60 1200 "$python" -m pytest "$@"; }

suite() {  # suite NAME [pytest args...]
    local name=$1; shift
    echo "--- $name: $(PYTHONPATH="$work/$name" "$python" -c 'import batchnorm; print(batchnorm.__file__)')"
    PYTHONPATH="$work/$name" pytest_run -q "$@"
}

for variant in "${@:-clang no-openmp sanitize}"; do
  for v in $variant; do
    case $v in
      clang)
        CC=clang CXX=clang++ build clang
        suite clang ;;
      no-openmp)
        build no-openmp -Ccmake.build-type=Debug -Ccmake.define.CMAKE_CXX_FLAGS_DEBUG=-O1 \
          -Ccmake.define.BATCHNORM_USE_OPENMP=OFF
        PYTHONPATH="$work/no-openmp" "$python" -c \
          'import batchnorm as bn; bn.set_num_threads(4); assert bn.get_num_threads() == 1, "serial build must report 1 thread"'
        suite no-openmp ;;
      sanitize)
        # The sanitizer runtimes must come first in the process, so they are preloaded into
        # Python (and the typing stub, which imports the module while building, is off).
        # Leak checking is off: CPython keeps interned objects alive at exit. torch is
        # hidden (its own allocator and libraries do not load under a preloaded ASan), so the
        # torch parity tests skip here and run in the plain builds.
        flags="-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined"
        build sanitize -Ccmake.build-type=Debug -Ccmake.define.BATCHNORM_STUBS=OFF \
          "-Ccmake.define.CMAKE_CXX_FLAGS=$flags" \
          "-Ccmake.define.CMAKE_SHARED_LINKER_FLAGS=-fsanitize=address,undefined"
        # The same API as the plain build, whose stub the typing tests read.
        cp "$("$python" -c 'import batchnorm, os; print(os.path.dirname(batchnorm.__file__))')/_core.pyi" \
           "$work/sanitize/batchnorm/"
        mkdir -p "$work/no-torch/torch"
        echo 'raise ModuleNotFoundError("torch is hidden in the sanitizer run")' > "$work/no-torch/torch/__init__.py"
        LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)" \
        ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
          PYTHONPATH="$work/sanitize:$work/no-torch" pytest_run -q -p no:cacheprovider ;;
      *) echo "variants.sh: unknown variant $v" >&2; exit 2 ;;
    esac
  done
done
