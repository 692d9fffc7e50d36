#!/usr/bin/env bash
# On a CUDA machine, one command: the GPU tests, then the harness-vs-plain-PyTorch benchmark on
# the GPU. Usage: scripts/gpu_check.sh [extra l2lab.bench arguments]
# Exits non-zero when no GPU is visible (instead of "passing" with every GPU test skipped), when a
# test fails, or when the benchmark fails.
set -euo pipefail
case "${1:-}" in
    -h|--help)
        cat <<'EOF'
Usage: scripts/gpu_check.sh [extra l2lab.bench arguments]

On a CUDA machine, one command: the GPU tests (pytest -m gpu), the harness-vs-plain-PyTorch
benchmark on the GPU (python -m l2lab.bench --device cuda ARGS), a 16-λ sweep benchmark,
vectorized vs basic launcher (python -m l2lab.bench --sweep), and a 500-job MNIST-1D sweep
(100 λ × 5 seeds, 50 epochs) against one ordinary run of the same config, with their ratio
(python -m l2lab.bench --vs-run 100 5), and the two-factor grid (5 lr × 8 λ × 3 seeds, 120
networks) as one stack against one stack per lr (python -m l2lab.bench --sweep --two-factor),
and ResNet-18 on CIFAR-shaped synthetic tensors in bf16 and channels-last: one 45,000-image epoch
of the harness against a plain loop, and 8 networks stacked against 8 in turn
(python -m l2lab.bench --resnet).

Uses $PYTHON, else .venv/bin/python (made with `make venv` when missing).
Exit status: 0 when all pass; 3 when torch sees no GPU (rather than passing with every GPU test
skipped); non-zero when a test or a benchmark fails.
EOF
        exit 0 ;;
esac
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || { make venv >/dev/null && PY=.venv/bin/python; }

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device visible to torch; nothing to check" >&2
    exit 3
fi
"$PY" -c 'import torch; print("gpu_check:", torch.cuda.get_device_name(0), "torch", torch.__version__)'

echo "== GPU tests (pytest -m gpu)"
"$PY" -m pytest -m gpu -q -rs tests

echo "== benchmark: harness vs a plain PyTorch loop (l2lab.bench --device cuda)"
"$PY" -m l2lab.bench --device cuda "$@"

# A 16-λ sweep, vectorized vs basic launcher on the GPU (plain loops on the GPU too). Digits need
# no download; for MNIST fetch it first (scripts/download_data.py) and add data=mnist.
echo "== sweep benchmark: 16 λ, vectorized vs basic launcher (l2lab.bench --sweep)"
"$PY" -m l2lab.bench --sweep --repeats 1 -- \
    regularization.lam=0,1e-4,3e-4,1e-3,3e-3,1e-2,2e-2,3e-2,5e-2,0.1,0.2,0.3,0.5,1,2,3 seed=0

# 500 MNIST-1D jobs (100 λ × 5 seeds, 50 epochs each) as stacks, against one ordinary run
echo "== scale benchmark: a 500-job MNIST-1D sweep vs one run (l2lab.bench --vs-run 100 5)"
"$PY" -m l2lab.bench --vs-run 100 5 | tee /dev/stderr | "$PY" -c \
    'import json, sys; print("gpu_check: 500-job sweep / one run = %.2f" % json.load(sys.stdin)["ratio"])'

# λ × lr: 5 lr × 8 λ × 3 seeds (120 networks) as one stack, against one stack per lr
echo "== two-factor benchmark: 120 networks, one stack vs one per lr (bench --sweep --two-factor)"
"$PY" -m l2lab.bench --sweep --two-factor --repeats 1 -- \
    optimizer.lr=0.01,0.02,0.05,0.1,0.2 regularization.lam=0,1e-3,1e-2,3e-2,0.1,0.3,1,3 \
    seed=0,1,2 | tee /dev/stderr | "$PY" -c \
    'import json, sys; r = json.load(sys.stdin); print("gpu_check: per-lr stacks / one stack = %.2f, same numbers: %s" % (r["ratio_per_lr_over_one_stack"], r["same_final_val_ce"]))'

# ResNet-18, the cifar10_resnet18 preset's recipe, on CIFAR-shaped synthetic tensors (no download)
echo "== ResNet-18 benchmark: harness vs plain loop, 8 stacked vs 8 in turn (bench --resnet)"
"$PY" -m l2lab.bench --resnet --device cuda | tee /dev/stderr | "$PY" -c \
    'import json, sys; r = json.load(sys.stdin); print("gpu_check: resnet18 %s: harness / plain = %.2f (%.0f vs %.0f images/s), 8 in turn / 8 stacked = %.2f" % (r["settings"]["precision"], r["ratio_harness_over_plain"], r["harness"]["images_per_s"], r["plain"]["images_per_s"], r["ratio_sequential_over_stack"]))'
