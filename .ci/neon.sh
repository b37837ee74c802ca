#!/usr/bin/env bash
# Builds tests/cpp/kernel_parity_test.cpp for aarch64 and runs it under qemu-aarch64, so the NEON
# backend is tested on an x86 machine. Installs nothing: the caller provides the cross compiler
# and qemu (Debian/Ubuntu: apt-get install -y g++-aarch64-linux-gnu qemu-user).
#   .ci/neon.sh                        static -O2 build, run under qemu (no sysroot needed)
#   BATCHNORM_NEON_ASAN=1 .ci/neon.sh  also an ASan+UBSan build, dynamic (static ASan does not
#                                      exist), run with the cross sysroot; LSan cannot run under qemu
# Environment: CXX_AARCH64 (default aarch64-linux-gnu-g++), QEMU_AARCH64 (default qemu-aarch64),
# AARCH64_SYSROOT (default /usr/aarch64-linux-gnu), BUILD_DIR (default build/neon).
set -euo pipefail

cd "$(dirname "$0")/.."
cxx=${CXX_AARCH64:-aarch64-linux-gnu-g++}
qemu=${QEMU_AARCH64:-qemu-aarch64}
sysroot=${AARCH64_SYSROOT:-/usr/aarch64-linux-gnu}
out=${BUILD_DIR:-build/neon}

for tool in "$cxx" "$qemu"; do
    command -v "$tool" >/dev/null || { echo "neon.sh: $tool not found (apt-get install -y g++-aarch64-linux-gnu qemu-user)" >&2; exit 2; }
done
mkdir -p "$out"
flags=(-std=c++17 -Wall -Wextra -Icpp/include tests/cpp/kernel_parity_test.cpp)

echo "neon.sh: $cxx -O2 -static, run under $qemu"
"$cxx" -O2 -static "${flags[@]}" -o "$out/kernel_parity_test"
"$qemu" "$out/kernel_parity_test"

if [[ "${BATCHNORM_NEON_ASAN:-0}" == 1 ]]; then
    echo "neon.sh: $cxx -O1 -fsanitize=address,undefined, run under $qemu -L $sysroot"
    "$cxx" -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all "${flags[@]}" -o "$out/kernel_parity_test_asan"
    ASAN_OPTIONS=detect_leaks=0 "$qemu" -L "$sysroot" "$out/kernel_parity_test_asan"
fi
