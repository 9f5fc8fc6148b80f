#!/bin/bash
# The GPU checks of issue 9 in one script, for a machine with a CUDA GPU (CI has none):
#   bash benchmarks/gpu_check.sh [OUTPUT_FOLDER]      (default: runs/gpu-check)
# 1. the `cuda`-marked tests (a training step, evaluation, a cache fill and a DP-SGD step on CUDA; the
#    trainable state comes back on the CPU);
# 2. benchmarks/step_time.py on CUDA, with segment-anything's ViT-H image encoder at random weights for the
#    encoder rows (same shapes and cost as the real one, nothing downloaded);
# 3. `autosam train` of the demo's centralised budget (sites/polyp/demo_central.yaml) with --device cuda.
# Needs the project's Python packages (make setup, or PYTHONPATH) and the data root ($AUTOSAM_DATA or
# ../shared/data). Each step's output goes to OUTPUT_FOLDER; the script exits non-zero if a step failed.
set -u
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT_DIR=${1:-runs/gpu-check}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
"$PY" -c "import torch, sys; ok = torch.cuda.is_available(); print('torch', torch.__version__, 'cuda', ok, torch.cuda.get_device_name(0) if ok else ''); sys.exit(0 if ok else 3)" \
  || { echo "error: no CUDA GPU visible to torch"; exit 3; }
rc=0
"$PY" -m pytest -q -rs -m cuda tests/test_cuda.py -p no:cacheprovider 2>&1 | tee "$OUT_DIR/pytest_cuda.log" | tail -5
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
"$PY" benchmarks/step_time.py --device cuda --sam vit_h_random --steps 5 --batch-size 10 > "$OUT_DIR/step_time_cuda.json" \
  2> "$OUT_DIR/step_time_cuda.err" || rc=1
cat "$OUT_DIR/step_time_cuda.json"
"$PY" -m autosam_core.cli train sites/polyp/demo_central.yaml --device cuda --output "$OUT_DIR/demo_central" \
  > "$OUT_DIR/train_cuda.log" 2>&1 || rc=1
tail -8 "$OUT_DIR/train_cuda.log"
echo "gpu check: $([ $rc -eq 0 ] && echo passed || echo FAILED), outputs in $OUT_DIR"
exit $rc
