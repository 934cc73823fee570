#!/usr/bin/env bash
# The one command a GPU session runs, from the repository root:
#
#     bash bench/gpu_run.sh [extra bench/gpu.py flags]
#
# Installs the wheels carried in .whl/ (if any; a bare GPU image may lack diffusers / peft /
# accelerate) into /tmp/site, prints versions, then runs bench/gpu.py once per case, each in its
# own process under its own time limit (an out-of-memory or slow case loses only itself), in
# increasing size: sd-turbo, sdxl-turbo, sd35-large-turbo, flux-schnell. Budget on one H200:
# ~8 minutes in all (the 8B / 12B cases spend most of theirs writing and reading their random
# weights). Then a 1-process FSDP2 run through accelerate launch (sharded checkpoint, resume, final/),
# then bench/gpu_serve.py (the registered champion loaded on CUDA in bf16; needs mlflow).
# Results: $OUT/gpu_<case>.json, plan_<case>.txt, gpu_serve.json and gpu_run_log.txt (bench/results/ without $OUT).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
OUT_DIR="${OUT:-bench/results}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_run_log.txt"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  python3 -c "import sys, torch, diffusers, transformers, peft, accelerate; print('python', sys.version.split()[0], \
'torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, \
'peft', peft.__version__, 'accelerate', accelerate.__version__)"
  df -h /tmp | tail -1
} 2>&1 | tee "$LOG"
# case:seconds (the whole budget is ~470 s)
for spec in sd-turbo:60 sdxl-turbo:80 sd35-large-turbo:150 flux-schnell:180; do
  name="${spec%%:*}"; limit="${spec##*:}"
  start=$SECONDS
  timeout "$limit" python3 bench/gpu.py --case "$name" --work-dir /tmp --out "$OUT_DIR/gpu_$name.json" "$@" 2>&1 \
    | tee -a "$LOG"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s (limit $limit s)" | tee -a "$LOG"
done
# `sdpo plan`'s prediction for each case at bench/gpu.py's default settings (issue 21, item 3), to set
# beside the measured peaks in gpu_<case>.json. From the shipped full-size configs: their text
# encoders are the real ones, the benchmark's are one-layer stubs (SD3.5 without T5), so compare the
# measured training peak with the plan's peak minus its text-encoder rows.
for spec in sd-turbo:stabilityai/sd-turbo:512 sdxl-turbo:stabilityai/sdxl-turbo:512 \
    sd35-large-turbo:stabilityai/stable-diffusion-3.5-large-turbo:1024 \
    flux-schnell:black-forest-labs/FLUX.1-schnell:1024; do
  IFS=: read -r name model res <<< "$spec"
  python3 -m sdpo_core.cli plan --pipeline tiny-random --gpu-memory 80 \
    --set model.pretrained="$model" --set model.build=null --set model.mixed_precision=bf16 \
    --set model.gradient_checkpointing=true --set model.lora_rank=4 --set sample.num_steps=4 \
    --set sample.batch_size=2 --set sample.num_batches_per_epoch=1 --set train.batch_size=1 \
    --set sample.resolution="$res" --set reward.name=jpeg_compressibility \
    $([ "$name" = sd35-large-turbo ] && echo --set model.family_options.use_t5=false) \
    > "$OUT_DIR/plan_$name.txt" 2>&1
  echo "== plan $name: exit $?" | tee -a "$LOG"; cat "$OUT_DIR/plan_$name.txt" >> "$LOG"
done
# FSDP2 through the real launcher on this one GPU (issue 20, item 4; ~1.5 minutes): the tiny pipeline
# in bf16 with LoRA, sharded with fully_shard even in 1 process: a sharded checkpoint (sharded/*.distcp),
# a resume from it, and final/. (Two CPU processes run the same in tests/integration/test_fsdp.py.)
FS=/tmp/fsdp_smoke
FSDP="python3 -m accelerate.commands.launch --config_file configs/accelerate/fsdp_8gpu.yaml --num_processes 1 \
  -m sdpo_core.cli train --pipeline tiny-random --run-dir $FS --set tracking.backend=none --set model.mixed_precision=bf16"
rm -rf "$FS"
timeout 300 bash -c "python3 -m sdpo_core.cli base --pipeline tiny-random && $FSDP --set train.epochs=1 \
  && $FSDP --set train.epochs=2 --resume && ls $FS/checkpoints/epoch_0001/sharded $FS/final" 2>&1 | tail -25 | tee -a "$LOG"
echo "== fsdp: exit ${PIPESTATUS[0]}" | tee -a "$LOG"
# serving the champion from the registry on the GPU (issue 21, item 5): tiny families, ~1 minute
timeout 120 python3 bench/gpu_serve.py --out "$OUT_DIR/gpu_serve.json" 2>&1 | tee -a "$LOG"
echo "== serve: exit ${PIPESTATUS[0]}" | tee -a "$LOG"
