#!/usr/bin/env bash
# Cross-compiles the native kernels for aarch64 (compile only, the flags of native.py's build) and
# prints, per kernel, how many of its instructions are vector (NEON) and how many scalar
# floating point: the evidence that the hot loops run NEON on ARM (docs/arm.md).
#
#   tools/arm/disassembly.sh [kernels.cpp] [--full FILE]
#
# Needs g++-aarch64-linux-gnu (apt) and the project's .venv (torch's headers; they are the same
# for every architecture). CXX / OBJDUMP / PYTHON override the tools. --full FILE also writes the
# demangled disassembly of the counted functions.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
src=$root/src/gradfilter/_native/kernels.cpp
full=
while [ $# -gt 0 ]; do
  case $1 in
    --full) full=$2; shift 2 ;;
    *) src=$1; shift ;;
  esac
done
cxx=${CXX:-aarch64-linux-gnu-g++}
objdump=${OBJDUMP:-aarch64-linux-gnu-objdump}
py=${PYTHON:-$root/.venv/bin/python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# native.py's flags and the ones torch.utils.cpp_extension adds (see its build.ninja)
mapfile -t flags < <(cd "$root" && PYTHONPATH=src "$py" - 2>/dev/null <<'PY'
import sysconfig
from torch.utils import cpp_extension
from gradfilter import native
print(f"-DTORCH_EXTENSION_NAME={native._LIB_NAME}")
print("-DTORCH_API_INCLUDE_EXTENSION_H")
for path in cpp_extension.include_paths():
    print("-isystem"); print(path)
print("-isystem"); print(sysconfig.get_paths()["include"])
for flag in ["-fPIC", "-std=c++20", *native._CFLAGS]:
    print(flag)
PY
)
shown=()  # the flags without the include directories (machine-specific paths)
for ((i = 0; i < ${#flags[@]}; i++)); do
  if [ "${flags[i]}" = -isystem ]; then i=$((i + 1)); else shown+=("${flags[i]}"); fi
done
echo "# $("$cxx" --version | head -1)"
echo "# $cxx ${shown[*]} -isystem <torch, python includes> -c $(basename "$src")"
"$cxx" "${flags[@]}" -c "$src" -o "$tmp/kernels.o"
"$objdump" -d -C --no-show-raw-insn "$tmp/kernels.o" > "$tmp/kernels.s"
"$py" "$root/tools/arm/disassembly_counts.py" "$tmp/kernels.s" ${full:+--full "$full"}
