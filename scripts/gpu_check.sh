#!/usr/bin/env bash
# The GPU checks in one short run on a machine with a CUDA GPU (the tests stop after 5 minutes, the benchmark
# after 8; not yet timed on a GPU):
#   1. the `gpu` tests: the CUDA instances of the device-parametrized tests (grouped GEMM against the loop,
#      parity with transformers, Inductor against eager, compiled static-cache decoding, gradient checkpointing,
#      fp32 routers under bf16) and `jetmoe train` on one GPU in bf16-mixed, bf16-true and FSDP2 + compile;
#   2. the benchmark's `gpu` preset (default: GEMM peak, training and decoding; `GPU_BENCH_ARGS` replaces that).
# Logs, latest.json and latest.md go to OUT_DIR. Exit code 0 when both passed, 1 when one failed, 2 when the
# checks could not start.
#
#   bash scripts/gpu_check.sh OUT_DIR [WHEEL_DIR]
#
# python3 from PATH must hold a CUDA build of torch and jetmoe's dependencies; jetmoe itself runs from src/ (no
# install). Dependencies that Python lacks can come as wheels in WHEEL_DIR, installed offline to a temporary
# directory (made beforehand where pip can fetch: `pip wheel --no-deps -w WHEEL_DIR omegaconf==2.3.0
# antlr4-python3-runtime==4.9.3`, say, both pure Python).
set -uo pipefail
out=${1:?usage: bash scripts/gpu_check.sh OUT_DIR [WHEEL_DIR]}
wheels=${2:-}
bench_args=${GPU_BENCH_ARGS:---sections gemm,train,decode --iters 3 --train-iters 3}
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [[ -n "$wheels" ]]; then
    site=$(mktemp -d)
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl || exit 2
    export PYTHONPATH="$PYTHONPATH:$site"
fi
python3 - <<'EOF' | tee "$out/device.txt" || exit 2
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
EOF
status=0
timeout 300 python3 -m pytest -m gpu -p no:cacheprovider -q -rA 2>&1 | tee "$out/gpu_tests.log" || status=1
# shellcheck disable=SC2086  # the arguments are words
timeout 480 python3 bench/bench_vs_transformers.py --config gpu $bench_args --out-dir "$out" 2>&1 |
    tee "$out/bench.log" || status=1
exit "$status"
