#!/usr/bin/env bash
# One device call (one H100): bench/gpu_serve.py all --gpu --big (issues 7, 10): tiny agg and
# E/P/D servers on the GPU vs HF references over HTTP, then LLaVA-1.5-7B random bf16 E/P/D vs agg.
#   bash bench/gpu_serve.sh     (carry .whl, filled by ../shared/tools/gpu-wheels.sh + aiohttp deps)
# Locally (CPU, MPICH venv): MPIRUN=.venv/bin/mpirun PY=.venv/bin/python GPU_ARGS= bash bench/gpu_serve.sh
set -u
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} MMHPC_CACHE=${MMHPC_CACHE:-/tmp/mmhpc-cache}
OUT=${OUT:-/tmp/gpu_serve_out}; mkdir -p "$OUT"; export OUT
PY=${PY:-python3}
export MPIRUN=${MPIRUN:-mpirun --allow-run-as-root --oversubscribe --bind-to none}
# Open MPI as root (a singleton too), and no UCX inside MPI: NIXL brings its own UCX build.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_pml=ob1 OMPI_MCA_osc=^ucx \
  OMPI_MCA_btl=self,vader,tcp OMPI_MCA_btl_vader_single_copy_mechanism=none
{
if [ -d .whl ] && [ -n "$(ls .whl/*.whl 2>/dev/null)" ] && [ -z "${NO_WHL:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tail -2
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
$MPIRUN --version 2>&1 | head -2
timeout "${SERVE_TIMEOUT:-380}" $PY bench/gpu_serve.py all ${GPU_ARGS---gpu --big} --budget-s "${BUDGET_S:-360}" ${SERVE_ARGS:-}
echo "rc=$? === done $(date -u) ==="
} 2>&1 | tee "$OUT/run.log"
