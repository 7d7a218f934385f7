#!/usr/bin/env bash
# GPU validation run (docs/gpu-validation.md): on a host with a CUDA GPU, run the CUDA tests, build the two
# torch FP16 recipes on the target that matches the GPU, time batch 1 and 8 with and without CUDA-graph
# replay through accelc.runtime.load, and write everything into RESULTS_DIR:
#
#   steps.jsonl        one {"step", "rc", "seconds", "log"} line per step (written as each step ends)
#   *.log              each step's output
#   target.txt         the target chosen from the compute capability (sm_75 t4, sm_80 a100, sm_90 h100, else cuda)
#   versions.json      nvidia-smi, Python, torch, CUDA, cuDNN, GPUs, accelc's recorded packages
#   pytest.xml         JUnit XML of `pytest -m cuda`
#   NAME.report.json   (+ .report.md, .lock, .runtime.json) of each build
#   bench.json         batch-1/batch-8 latency, eager vs graph replay, replay == eager check
#   summary.json, summary.md
#
# Usage: scripts/gpu_validate.sh RESULTS_DIR
# Needs only what such a host has (torch with CUDA, onnx, onnxruntime) plus the small wheels carried in
# .whl/ (installed offline, only those whose distribution is missing). No network is used.
# Environment: PYTHON (default python3), STEP_TIMEOUT seconds per step (default 420), ACCELC_CACHE_DIR
# (default .gpu-cache in the repository), BENCH_ITERATIONS (default 200).
# Exit status: 0 when every step passed, 1 otherwise (every step runs either way), 2 on bad usage.
set -euo pipefail

if [[ $# -ne 1 || "$1" == -* ]]; then
    echo "usage: $0 RESULTS_DIR" >&2
    exit 2
fi
mkdir -p "$1"
RESULTS=$(cd "$1" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PY=${PYTHON:-python3}
STEP_TIMEOUT=${STEP_TIMEOUT:-420}
export ACCELC_CACHE_DIR=${ACCELC_CACHE_DIR:-$REPO/.gpu-cache}
export PYTHONUNBUFFERED=1 PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1
BUILD_ROOT="$REPO/build/gpu-validate"
mkdir -p "$BUILD_ROOT"
STEPS="$RESULTS/steps.jsonl"
: > "$STEPS"
FAILED=0

# step NAME CMD...: run CMD (a program or one of the functions below, in a child bash with -euo pipefail)
# under a timeout, its output in NAME.log; record its exit status and seconds. A failure is recorded and
# the run goes on.
step() {
    local name=$1
    shift
    local t0 t1 rc=0
    t0=$(date +%s%N)
    echo "== $name: $*" >&2
    timeout --kill-after=20 "$STEP_TIMEOUT" bash -c 'set -euo pipefail; "$@"' step "$@" \
        > "$RESULTS/$name.log" 2>&1 || rc=$?
    t1=$(date +%s%N)
    printf '{"step": "%s", "rc": %d, "seconds": %d.%03d, "log": "%s.log"}\n' \
        "$name" "$rc" $(((t1 - t0) / 1000000000)) $((((t1 - t0) / 1000000) % 1000)) "$name" >> "$STEPS"
    if [[ $rc -ne 0 ]]; then
        FAILED=1
        echo "   $name failed (exit $rc); see $RESULTS/$name.log" >&2
    fi
    return 0
}

install_accelc() {
    if [[ -d .whl ]]; then
        mapfile -t wheels < <("$PY" scripts/gpu_bench.py missing-wheels .whl)
        if [[ ${#wheels[@]} -gt 0 ]]; then
            echo "installing carried wheels: ${wheels[*]}"
            "$PY" -m pip install --no-index --no-deps "${wheels[@]}"
        fi
    fi
    if "$PY" -c "import accelc" 2>/dev/null; then
        echo "accelc already importable"
    elif "$PY" -m pip install --no-index --find-links .whl --no-deps -e .; then
        echo "installed with build isolation (setuptools and wheel from .whl/)"
    else
        echo "retrying without build isolation (the host's setuptools)"
        "$PY" -m pip install --no-index --no-build-isolation --no-deps -e . || {
            # last resort: the installed layout as symlinks (accelc = compiler/, accelc.passes = passes/, ...)
            echo "pip could not install accelc; using a symlinked package on PYTHONPATH ($SHIM)"
            rm -rf "$SHIM"
            mkdir -p "$SHIM/accelc"
            ln -s "$REPO"/compiler/* "$SHIM/accelc/"
            for d in passes plugins schemas; do ln -s "$REPO/$d" "$SHIM/accelc/$d"; done
            export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
        }
    fi
    "$PY" -c "import accelc, accelc.plugins, accelc.passes.cuda_graph; print('accelc from', accelc.__file__)"
}

versions() {
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader \
            > "$RESULTS/nvidia-smi.csv" || echo "nvidia-smi query failed (exit $?)"
        cat "$RESULTS/nvidia-smi.csv"
        nvidia-smi > "$RESULTS/nvidia-smi.txt" 2>&1 || true
    else
        echo "nvidia-smi not found"
    fi
    "$PY" scripts/gpu_bench.py versions "$RESULTS/versions.json" --nvidia-smi "$RESULTS/nvidia-smi.csv"
    "$PY" -m accelc.cli env > "$RESULTS/accelc-env.json" || true
}

choose_target() {
    "$PY" scripts/gpu_bench.py target | tee "$RESULTS/target.txt"
}

# build NAME: build recipes/NAME.yaml on the chosen target; keep its reports even when it fails.
build() {
    local name=$1 rc=0 out="$BUILD_ROOT/$1"
    rm -rf "$out"
    "$PY" -m accelc.cli plan "recipes/$name.yaml" --target "$TARGET" || rc=$?
    if [[ $rc -eq 0 ]]; then
        "$PY" -m accelc.cli build "recipes/$name.yaml" --target "$TARGET" --out "$out" || rc=$?
    fi
    for f in report.json report.md accelc.lock runtime.json; do
        if [[ -f "$out/$f" ]]; then
            cp "$out/$f" "$RESULTS/$name.$f"
        fi
    done
    return "$rc"
}

bench() {
    local args=()
    for name in resnet18_cuda_fp16 efficientnet_lite0_cuda_fp16; do
        if [[ -f "$BUILD_ROOT/$name/runtime.json" ]]; then
            args+=(--build "$name=$BUILD_ROOT/$name")
        fi
    done
    if [[ ${#args[@]} -eq 0 ]]; then
        echo "no build produced a runtime.json to time"
        return 1
    fi
    "$PY" scripts/gpu_bench.py bench "$RESULTS/bench.json" "${args[@]}" --iterations "${BENCH_ITERATIONS:-200}"
}

SHIM="$BUILD_ROOT/shim"
rm -rf "$SHIM"
export PY RESULTS REPO BUILD_ROOT SHIM
export -f install_accelc versions choose_target build bench
step install install_accelc
if [[ -d "$SHIM/accelc" ]]; then
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
fi
step versions versions
step target choose_target
TARGET=$(cat "$RESULTS/target.txt" 2> /dev/null || true)
TARGET=${TARGET:-cuda}
export TARGET
step pytest_cuda "$PY" -m pytest tests/test_gpu_passes.py tests/test_gpu_runtimes.py -m cuda -v -rs \
    -p no:cacheprovider --junitxml="$RESULTS/pytest.xml"
step build_resnet18_cuda_fp16 build resnet18_cuda_fp16
step build_efficientnet_lite0_cuda_fp16 build efficientnet_lite0_cuda_fp16
step bench bench
"$PY" scripts/gpu_bench.py summary "$RESULTS" > "$RESULTS/summary.log" 2>&1 || true
if [[ -f "$RESULTS/summary.md" ]]; then
    cat "$RESULTS/summary.md"
fi
if [[ "${RESULTS_PACK:-0}" == 1 ]]; then
    # Where only a few files can be copied back from the GPU machine: everything in one archive,
    # the two summaries beside it.
    tar -czf "$BUILD_ROOT/results.tar.gz" -C "$RESULTS" . && find "$RESULTS" -mindepth 1 \
        ! -name summary.md ! -name summary.json -delete && mv "$BUILD_ROOT/results.tar.gz" "$RESULTS/"
fi
exit "$FAILED"
