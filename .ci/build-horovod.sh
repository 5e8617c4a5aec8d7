#!/usr/bin/env bash
# Opt-in: build Horovod 0.28.1 (its last release) from the sdist into the project venv.
# There is no wheel for current Python/torch, and the sdist's CMake asks for C++14,
# which torch 2.x headers reject; we raise the standard and build CPU-only with Gloo.
set -euo pipefail
cd "$(dirname "$0")/.."

HVD_VERSION=0.28.1
PY="${VENV:-.venv}/bin/python"
[ -x "$PY" ] || { echo "build-horovod: $PY not found; run 'make setup' first" >&2; exit 1; }

# A rebuild takes minutes, so a working install of the right version is left alone.
if "$PY" - "$HVD_VERSION" 2>/dev/null <<'EOF'
import sys
import horovod
import horovod.torch as hvd
sys.exit(0 if horovod.__version__ == sys.argv[1] and hvd.gloo_built() else 1)
EOF
then
    echo "build-horovod: horovod $HVD_VERSION with torch+gloo already installed; skipping"
    exit 0
fi

start=$(date +%s)
work=$(mktemp -d "${TMPDIR:-/tmp}/horovod-build.XXXXXX")
trap 'rm -rf "$work"' EXIT

# Runtime deps first: setup.py lists them in setup_requires for build actions, and with
# --no-build-isolation setuptools would otherwise try to fetch them itself.
# Not horovod[spark]: that extra pins pyarrow<11, which would downgrade the project's pyarrow.
"$PY" -m pip install --quiet cloudpickle psutil pyyaml packaging 'cffi>=1.4.0'

"$PY" -m pip download --quiet --no-binary :all: --no-deps "horovod==$HVD_VERSION" -d "$work"
tar -xzf "$work/horovod-$HVD_VERSION.tar.gz" -C "$work"
src="$work/horovod-$HVD_VERSION"

# torch 2.0-2.9 headers need C++17; newer ones #error below C++20. Ask the headers, not a version table.
tinc=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))')
if grep -qs 'C++20 or later' "$tinc/ATen/ATen.h" "$tinc/torch/csrc/api/include/torch/all.h"; then
    cxx_std=20
else
    cxx_std=17
fi
cxx_std="${HOROVOD_CXX_STANDARD:-$cxx_std}"

# Edit a line in the sdist, failing loudly if it is not there: a changed sdist must not build silently wrong.
patch_line() {  # file, sed expression, fixed string that must exist after the edit
    local file="$src/$1"
    sed -i "$2" "$file"
    grep -qxF "$3" "$file" || { echo "build-horovod: patch '$2' did not apply to $1" >&2; exit 1; }
}
patch_line CMakeLists.txt \
    "s/^set(CMAKE_CXX_STANDARD 14)\$/set(CMAKE_CXX_STANDARD $cxx_std)/" \
    "set(CMAKE_CXX_STANDARD $cxx_std)"
patch_line horovod/torch/CMakeLists.txt \
    "s/^    set(CMAKE_CXX_STANDARD 14)\$/    set(CMAKE_CXX_STANDARD $cxx_std)/" \
    "    set(CMAKE_CXX_STANDARD $cxx_std)"
# The venv's torch is a CUDA build; if a CUDA toolkit is found, Horovod would build GPU ops against it.
# No env var turns that off (CUDA_HOME='' makes it worse), so tell its FindPytorch torch has no CUDA.
patch_line cmake/Modules/FindPytorch.cmake \
    '/^string(TOUPPER "${Pytorch_CUDA}" Pytorch_CUDA)$/a set(Pytorch_CUDA FALSE)' \
    'set(Pytorch_CUDA FALSE)'

echo "build-horovod: building horovod $HVD_VERSION (C++$cxx_std, CPU, Gloo, PyTorch only); this takes a while"
# --no-build-isolation: compile against the venv's torch, not a fresh one pip would fetch.
# Unset every GPU selector so a developer's shell cannot turn GPU ops back on.
env -u HOROVOD_GPU -u HOROVOD_GPU_OPERATIONS -u HOROVOD_GPU_ALLREDUCE -u HOROVOD_GPU_ALLGATHER \
    -u HOROVOD_GPU_BROADCAST -u HOROVOD_GPU_ALLTOALL -u HOROVOD_GPU_REDUCESCATTER -u HOROVOD_CUDA_HOME \
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
    HOROVOD_WITHOUT_MPI=1 HOROVOD_WITH_GLOO=1 HOROVOD_CPU_OPERATIONS=GLOO \
    MAKEFLAGS="-j${HOROVOD_BUILD_JOBS:-2}" \
    "$PY" -m pip install --no-build-isolation --no-cache-dir "$src"

"$PY" -c 'import horovod, horovod.torch as hvd; assert hvd.gloo_built() and not hvd.mpi_built() and not hvd.cuda_built(); print("build-horovod: horovod", horovod.__version__, "OK")'
echo "build-horovod: done in $(( $(date +%s) - start ))s"
