#!/usr/bin/env bash
# The prepared GPU check (issue 12): one script, run from the repository root on a machine with NVIDIA GPUs, a
# CUDA PyTorch and no network; sized to finish in about 8 minutes on one H200.
#   1. install: the missing packages from the wheels in bench/gpu_wheels/ (bench/gpu_wheels.sh fetches them on a
#      connected machine), then this project with `pip install --no-deps -e .` against the machine's own
#      torch / timm / transformers; then every module the suite imports is imported once, versions printed;
#   2. pytest -m gpu (tests/test_gpu.py): bf16 terms, ZeRO-2/3 resume, compiled towers, fused kernels, and with
#      2+ GPUs NCCL runs of ZeRO-2/3 and of the gathered negatives;
#   3. throughput (bench/gpu_throughput.py): open_clip's ViT-B-16 step, CLIP-only and full Uni-Mlip through the
#      engine, the full step fed by the real loader, then both compiled; one JSON line per case and a `goals`
#      line in OUT/gpu_suite.jsonl;
#   4. with 2+ GPUs, the synchronous against the functional autograd all-gather (bench/gather_bench.py);
#   5. the loss-spike guard's per-step cost against the same loop without it (bench/health_overhead.py).
# Everything goes to OUT (default $OUT, else bench/results/latest): gpu_suite.log, gpu_suite.jsonl,
# gpu_tests.xml. Exits non-zero when a step failed.
#
#   usage: bench/gpu_suite.sh [--cpu-smoke] [--out DIR] [--wheels DIR] [--no-install]
#   --cpu-smoke   the same steps at tiny sizes on CPU (CI runs it: 2 minutes at most)
#   PYTHON=...    the interpreter (default python3: on the GPU machine, the one that holds its CUDA torch)
set -uo pipefail
cd "$(dirname "$0")/.."

smoke=0
install=1
out="${OUT:-bench/results/latest}"
wheels=bench/gpu_wheels
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) smoke=1 ;;
    --out) out="$2"; shift ;;
    --wheels) wheels="$2"; shift ;;
    --no-install) install=0 ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 0 ;;
    *) echo "gpu_suite.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
py="${PYTHON:-python3}"
mkdir -p "$out"
log="$out/gpu_suite.log"
exec > >(tee -a "$log") 2>&1
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
failed=()

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 WANDB_MODE=disabled
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
# On a small shared CPU, more than one thread per process only spins: the smoke runs 10x slower with 2.
[ "$smoke" -eq 1 ] && export OMP_NUM_THREADS=1
# As tests/conftest.py: DeepSpeed's JIT-built ops cached with the interpreter, always built with its ninja.
prefix=$("$py" -c 'import os, sys; print(sys.prefix, os.path.dirname(sys.executable))') || {
  echo "gpu_suite.sh: cannot run $py" >&2; exit 1; }
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${prefix% *}/torch_extensions}" PATH="${prefix#* }:$PATH"
echo "== gpu_suite: $(date -u +%FT%TZ) smoke=$smoke python=$py out=$out"

# ---------------------------------------------------------------------------------------------- 1. install
if [ "$install" -eq 1 ]; then
  echo "== 1. install ($(elapsed) s)"
  # The pinned packages this interpreter lacks (a package it has, at any version, stays as it is).
  missing=$("$py" - bench/gpu_wheels.txt <<'EOF'
import importlib.metadata as md, re, sys
for line in open(sys.argv[1], encoding="utf-8"):
    spec = line.split("#")[0].strip()
    if spec:
        try:
            md.version(re.split(r"[=<>!~]", spec)[0])
        except md.PackageNotFoundError:
            print(spec)
EOF
)
  if [ -n "$missing" ]; then
    if ls "$wheels"/*.whl >/dev/null 2>&1; then
      echo "installing from $wheels: $(echo $missing)"
      # shellcheck disable=SC2086
      "$py" -m pip install --quiet --no-index --no-deps --no-cache-dir --find-links "$wheels" $missing \
        || failed+=("install wheels")
    else
      echo "missing and no wheels in $wheels (bench/gpu_wheels.sh fetches them): $(echo $missing)"
      failed+=("install wheels")
    fi
  fi
  # The project itself, against this machine's torch / timm / transformers (no dependency resolution), unless
  # this checkout is installed already (CI's venv). -I: the current folder must not count as installed.
  here=$("$py" -I -c 'import importlib.util as u; s = u.find_spec("unimlip_train"); print(s.origin if s else "")')
  if [ "$here" = "$PWD/unimlip_train/__init__.py" ]; then
    echo "unimlip: installed from this checkout already"
  else
    "$py" -m pip install --quiet --no-deps --no-build-isolation --no-cache-dir -e . \
      || "$py" -m pip install --quiet --no-deps --no-cache-dir -e . || failed+=("pip install -e .")
  fi
fi
# Every module the suite needs, with its version; then (last line) how many GPUs this interpreter sees.
gpus=$("$py" - <<'EOF' | tail -n 1
import importlib, importlib.metadata as md, sys
versions = []
for module, dist in [("torch", "torch"), ("timm", "timm"), ("transformers", "transformers"),
                     ("deepspeed", "deepspeed"), ("webdataset", "webdataset"),
                     ("submitit", "submitit"), ("pydicom", "pydicom"), ("open_clip", "open_clip_torch"),
                     ("unimlip_train.engine.trainer", "unimlip")]:
    try:
        importlib.import_module(module)
        versions.append(f"{dist} {md.version(dist)}")
    except Exception as e:  # noqa: BLE001
        versions.append(f"{dist} BROKEN ({type(e).__name__}: {e})")
print("imports:", ", ".join(versions), file=sys.stderr)
import torch
print(torch.cuda.device_count() if torch.cuda.is_available() else 0)
sys.exit(3 if any("BROKEN" in v for v in versions) else 0)
EOF
)
rc=$?
[ "$rc" -eq 3 ] && failed+=("imports")
[ "$rc" -ne 0 ] && [ "$rc" -ne 3 ] && { echo "gpu_suite.sh: $py cannot import torch" >&2; exit 1; }
if [ "$smoke" -eq 0 ] && [ "$gpus" -eq 0 ]; then
  echo "gpu_suite.sh: no CUDA GPU visible to $py; on a CPU machine run: bench/gpu_suite.sh --cpu-smoke" >&2
  exit 1
fi
export DS_ACCELERATOR="$([ "$gpus" -gt 0 ] && echo cuda || echo cpu)"
echo "gpus: $gpus"
[ "$gpus" -gt 0 ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# --------------------------------------------------------------------------------------------- 2. pytest
echo "== 2. pytest -m gpu ($(elapsed) s)"
pytest_env=(CUBLAS_WORKSPACE_CONFIG=:4096:8)  # deterministic cuBLAS: the fp32 resume test compares bit for bit
[ "$smoke" -eq 1 ] && pytest_env+=(UNIMLIP_GPU_SMOKE=1)
env "${pytest_env[@]}" "$py" -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider \
  --junitxml="$out/gpu_tests.xml"
rc=$?
# exit 5: nothing collected (a marker or an import broke), a failure like any other
[ "$rc" -ne 0 ] && failed+=("pytest -m gpu (exit $rc)")

# ----------------------------------------------------------------------------------------- 3. throughput
echo "== 3. throughput ($(elapsed) s)"
smoke_flag=()
[ "$smoke" -eq 1 ] && smoke_flag=(--smoke)
# Cases start while the suite is under 7 minutes old (the last, compiled ones can then take a minute or two).
budget=$(( 420 - $(elapsed) )); [ "$budget" -lt 60 ] && budget=60
"$py" bench/gpu_throughput.py "${smoke_flag[@]}" --out "$out" --budget-s "$budget" || failed+=("throughput")

# ------------------------------------------------------------------------------------------- 4. all-gather
echo "== 4. gathered negatives: synchronous vs functional autograd all-gather ($(elapsed) s)"
if [ "$gpus" -ge 2 ]; then
  "$py" -m torch.distributed.run --standalone --nproc_per_node "$gpus" bench/gather_bench.py --out "$out" \
    || failed+=("gather bench")
elif [ "$smoke" -eq 1 ]; then  # the smoke runs it on 2 CPU processes over gloo, a few calls
  OMP_NUM_THREADS=1 timeout 120 "$py" -m torch.distributed.run --standalone --nproc_per_node 2 \
    bench/gather_bench.py --rows 8 --widths 16 --iters 2 --warmup 1 --out "$out" || failed+=("gather bench")
else
  line="{\"case\": \"gather\", \"skipped\": \"needs 2 or more GPUs, found $gpus\"}"
  echo "$line"; echo "$line" >> "$out/gpu_suite.jsonl"
fi

# ------------------------------------------------------------------------------------ 5. spike-guard cost
echo "== 5. the loss-spike guard's per-step cost ($(elapsed) s)"
"$py" bench/health_overhead.py "${smoke_flag[@]}" --out "$out" || failed+=("health overhead")

# -------------------------------------------------------------------------------------------- summary
echo "== done in $(elapsed) s; results: $out/gpu_suite.jsonl"
"$py" - "$out/gpu_suite.jsonl" <<'EOF'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1], encoding="utf-8") if l.strip()]
goals = [l for l in lines if l.get("case") == "goals"]
for name, g in (goals[-1]["goals"].items() if goals else []):
    mark = {True: "met", False: "NOT met", None: "not judged (smoke sizes)" if goals[-1].get("smoke") else "not measured"}[g["met"]]
    print(f"  {name:36s} {str(g['value']):>8s}  goal {g['target']:8s} {mark}")
EOF
if [ "${#failed[@]}" -gt 0 ]; then
  echo "gpu_suite.sh: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "gpu_suite.sh: every step passed"
