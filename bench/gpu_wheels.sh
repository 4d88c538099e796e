#!/usr/bin/env bash
# Download the wheels of bench/gpu_wheels.txt for the GPU machine (CPython 3.12, manylinux x86-64) into
# bench/gpu_wheels/ (git-ignored), on a machine with network access. deepspeed is published as a source
# distribution only: its pure-Python wheel is built here (no CUDA ops are compiled; DeepSpeed builds any op it
# needs at run time, and the suite needs none). Prints the folder's size, which must stay under 64 MiB (what
# travels to the GPU machine with the working tree).
#   usage: bench/gpu_wheels.sh [DEST]        (PYTHON=... picks the pip to use; default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-bench/gpu_wheels}"
py="${PYTHON:-python3}"
mkdir -p "$dest"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
while read -r line; do
  spec="${line%%#*}"; spec="${spec// /}"
  [ -z "$spec" ] && continue
  if ! "$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${platforms[@]}" -d "$dest" "$spec" 2>/dev/null; then
    echo "no wheel for $spec: building a pure-Python wheel" >&2
    "$py" -m pip wheel --quiet --no-deps -w "$dest" "$spec"
    name="${spec%%==*}"
    if ! ls "$dest"/"${name//-/_}"-*-py3-none-any.whl >/dev/null 2>&1; then
      echo "error: the wheel built for $spec is not pure Python; it cannot travel to the GPU machine" >&2
      exit 1
    fi
  fi
done < bench/gpu_wheels.txt
count=$(ls "$dest"/*.whl | wc -l)
bytes=$(cat "$dest"/*.whl | wc -c)
echo "$count wheels, $((bytes / 1024)) KiB in $dest"
if [ "$bytes" -ge $((64 * 1024 * 1024)) ]; then
  echo "error: over 64 MiB: too large to travel with the working tree" >&2
  exit 1
fi
