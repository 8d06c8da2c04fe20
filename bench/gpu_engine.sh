#!/usr/bin/env bash
# Issue 8 GPU run (device tool): bash bench/gpu_engine.sh [parts,comma,separated]
# parts: ceilings,correctness,llava,offline,qwen (default: all). Results in $OUT.
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8 MMHPC_CACHE=/tmp/mmhpc-cache PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "${OUT:-/tmp}/gpu.txt"
python3 -c "import transformers, triton, torch; print(transformers.__version__, triton.__version__, torch.__version__)"
python3 bench/gpu_engine.py "$@" 2>&1 | tee "${OUT:-/tmp}/gpu_engine.log"
