#!/usr/bin/env bash
# The GPU check of issue 17, one command (<= 8 minutes on an H200):
#     bash scripts/gpu_check.sh OUTDIR [--quick] [--only SECTIONS] [--budget SECONDS]
# Runs from the source tree with the machine's own Python (PYTHONPATH=., nothing installed, no network) and writes
# OUTDIR/gpu.json and OUTDIR/gpu_check.log. Without CUDA it says so and exits 2 at once. The logic is in
# scripts/gpu_check.py; PYTHON overrides the interpreter (default python3).
set -uo pipefail
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: bash scripts/gpu_check.sh OUTDIR [gpu_check.py options]" >&2
    exit 64
fi
OUT=$1
shift
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
export CUBLAS_WORKSPACE_CONFIG=:4096:8 # before anything starts CUDA: deterministic cuBLAS
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT" || exit 1
LOG=$OUT/gpu_check.log

fail() {
    echo "gpu_check: $1" | tee -a "$LOG" >&2
    exit 2
}

command -v nvidia-smi >/dev/null 2>&1 || fail "no CUDA here: nvidia-smi is not on PATH (this check needs an NVIDIA GPU)"
nvidia-smi -L >/dev/null 2>&1 || fail "no CUDA here: nvidia-smi finds no usable GPU ($(nvidia-smi -L 2>&1 | head -1))"
probe=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()), torch.__version__)' 2>&1) ||
    fail "$PY cannot import torch: ${probe##*$'\n'}"
case $probe in
1\ *) ;;
*) fail "no CUDA here: torch ${probe#* } sees no CUDA device (torch.cuda.is_available() is False)" ;;
esac

{
    echo "gpu_check: $(date -u +%FT%TZ) $(nvidia-smi -L | head -1); $PY $("$PY" -V 2>&1 | cut -d' ' -f2), torch ${probe#* }"
    if rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null); then
        git -C "$ROOT" diff --quiet HEAD 2>/dev/null || rev="$rev (modified)"
        echo "gpu_check: source tree at git $rev"
    fi
} | tee -a "$LOG"
cd "$ROOT" || exit 1
# the Python budget defaults to 420 s; the hard stop leaves room for its last JSON write
timeout -k 10 470 "$PY" scripts/gpu_check.py --out "$OUT" "$@" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] && echo "gpu_check: stopped at the 470 s hard limit; $OUT/gpu.json has the sections that finished" | tee -a "$LOG"
exit "$rc"
