# Sourced, in the repository root, by the device scripts (gpu_train_eval.sh, gpu_timed_runs.sh):
# the environment a run needs, timing of its phases, and detectron2 from the carried kit.
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export NUCSEG_DATASETS=${NUCSEG_DATASETS:-$PWD/.device/data}
export NUCSEG_CACHE=${NUCSEG_CACHE:-/tmp/nucseg_cache}
run_start=$(date +%s); phase_start=$run_start
phase() {  # phase NAME: print the seconds since the last phase ended, and in all
  local now; now=$(date +%s)
  echo "[phase] $1: $((now - phase_start)) s (total $((now - run_start)) s)"; phase_start=$now
}
elapsed() { echo $(( $(date +%s) - run_start )); }

# Installs the kit (.device/kit) into .device/site when detectron2 is not importable (the GPU
# machine); on a machine that has it (this project's .venv) the same script runs unchanged.
use_detectron2() {
  if ! "$PYTHON" -c "import detectron2" 2>/dev/null; then
    bash .device/kit/install.sh "$PWD/.device/site"
    export PYTHONPATH="$PWD/.device/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  "$PYTHON" -c "import torch, detectron2; print('torch', torch.__version__, 'detectron2', detectron2.__version__,
    'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
}
