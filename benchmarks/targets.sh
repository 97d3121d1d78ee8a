#!/usr/bin/env bash
# Every issue-7 speed target of one accelerator, measured with `python -m tok1d.cli.bench` (random
# weights, the configs' real programs). One call on the device machine:
#
#   bash benchmarks/targets.sh OUT_DIR      # appends OUT_DIR/bench.jsonl, logs OUT_DIR/*.log
#
# The device machine (Python 3.12, jax + CUDA, flax, optax, orbax) lacks grain, clu and
# ml_collections: carry an ignored .whl/ folder holding their wheels for Python 3.12 and 3.11
# (gpu_session.sh installs those of the machine's Python by name):
#   for v in 3.12 3.11; do pip download -q -d .whl --no-deps --only-binary=:all: \
#     --python-version $v --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux_2_28_x86_64 grain array_record dm-tree more-itertools portpicker \
#     clu ml_collections; done
# Each target is one process (compilation included), so 10 targets need several minutes: split
# them over calls with the per-call limit in mind, e.g. TARGETS="titok_s1_b64 gpt_b_sample".
# TOK1D_BENCH_FLAGS="--compile_only" only compiles (memory plans, no timing);
# TOK1D_BENCH_STEPS=3 TOK1D_BENCH_FLAGS=--profile=/tmp/prof profiles the timed calls and each
# target's log ends with where the device's time went (top ops, launches, busy time per call).
# WARM=1 first compiles the selected targets JOBS at a time (default 3), one --compile_only
# process each (OUT_DIR/compile.jsonl: the device's memory plans), filling the persistent
# compilation cache, then times the targets one by one from that cache, so that one call's wall
# time is less than the sum of all compiles. The concurrent compiles share the device while
# XLA autotunes kernels: its timings get noisy ("Delay kernel timed out" in the logs) and all
# ten at once ran out of device memory on an H200 (RESULTS.md). DEADLINE=S skips the targets still to
# be timed once S seconds have passed since the script started; TARGET_TIMEOUT=S stops any one
# target's process after S seconds.
#
# Targets (../shared/baselines.md: the official code on an H100 at the same batch):
#   TiTok-L-32 stage-1 train >= 320 img/s @64 | stage-2 train >= 150 @32, batch 64 fits
#   TiTok-L-32 8-step sampling + decode >= 400 @125 | GigaTok B-L train >= 85 @16, 32 fits
#   GigaTok B-L encode >= 960 @64, decode >= 500 @64 | GPT-B 256-token CFG sampling >= 220 @64
#   RAR-B 256-token CFG sampling + MaskGIT-VQGAN decode @64 (no official number in baselines.md)
# and five variants (titok_s1_cudnn, titok_s2_cudnn, gigatok_b16_cudnn, gpt_b_whole,
# gpt_b_cudnn) to compare with them. The samplers run in bf16, as the official baselines
# (the recipes' own sampling_precision is the gFID protocols' float32).
set -uo pipefail
OUT=${1:?usage: benchmarks/targets.sh OUT_DIR}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
STEPS=${TOK1D_BENCH_STEPS:-10}
LIMIT=${TARGET_TIMEOUT:-0}  # seconds per target process (0: none)
JOBS=${JOBS:-3}             # WARM=1: compiles at once

# Each `bench NAME ARGS...` line in targets() registers a target; they run in the order of
# TARGETS="name ..." (default: every target, in the listed order).
NAMES=()
declare -A ARGS
bench() { local name=$1; shift; NAMES+=("$name"); ARGS[$name]=$(printf '%q ' "$@"); }

compile_one() {  # in the background, JOBS at a time; the caller waits
  local name=$1; shift
  while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n; done
  # --foreground: a timeout killed by an outer one (gpu_session.sh's parts) takes its command
  # with it, instead of leaving it running on the device into the next part
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout --foreground "$LIMIT" $PY -m tok1d.cli.bench \
    --compile_only --out="$OUT/compile.jsonl" "$@" > "$OUT/$name.compile.log" 2>&1 &
}

time_one() {
  local name=$1; shift
  if [[ -n "${DEADLINE:-}" && $SECONDS -ge $DEADLINE ]]; then
    echo "== $name: skipped (DEADLINE=$DEADLINE s passed)"; return 0
  fi
  echo "== $name"
  if timeout --foreground "$LIMIT" $PY -m tok1d.cli.bench --steps="$STEPS" --warmup=2 \
      --out="$OUT/bench.jsonl" ${TOK1D_BENCH_FLAGS:-} "$@" > "$OUT/$name.log" 2>&1; then
    tail -n 3 "$OUT/$name.log"
  else
    echo "FAILED (see $OUT/$name.log)"; tail -n 5 "$OUT/$name.log"
  fi
}

targets() {

bench titok_s1_b64   --config=configs/titok.py:l32_stage1 --workload=train --batch_size=64
bench titok_s2_b32   --config=configs/titok.py:l32_stage2 --workload=train --batch_size=32
bench titok_s2_b64   --config=configs/titok.py:l32_stage2 --workload=train --batch_size=64 \
                     --config.model.cnn_remat=full
bench titok_sample   --config=configs/maskgit_titok.py:l32 --workload=sample --batch_size=125 \
                     --tokenizer_config=configs/titok.py:l32_stage2 \
                     --config.sampling_precision=bfloat16
bench gigatok_b16    --config=configs/gigatok_b_l.py --workload=train --batch_size=16
# (a variant: cuDNN's fused attention in B-L's training step; timed before batch 32)
bench gigatok_b16_cudnn --config=configs/gigatok_b_l.py --workload=train --batch_size=16 \
                     --config.model.attention_impl=cudnn
bench gigatok_b32    --config=configs/gigatok_b_l.py --workload=train --batch_size=32
bench gigatok_encode --config=configs/gigatok_b_l.py --workload=encode --batch_size=64
bench gigatok_decode --config=configs/gigatok_b_l.py --workload=decode --batch_size=64
bench gpt_b_sample   --config=configs/gpt_gigatok.py:b --workload=sample --batch_size=64 \
                     --tokenizer_config=configs/gigatok_b_l.py \
                     --config.sampling_precision=bfloat16
bench rar_b_sample   --config=configs/rar.py:b --workload=sample --batch_size=64 \
                     --tokenizer_config=benchmarks/maskgit_vqgan_tokenizer.py \
                     --config.sampling_precision=bfloat16
# Variants, to compare with the targets above in the same call:
# cuDNN's fused attention in the TiTok steps (XLA's attention writes 289 x 289 scores per head)
bench titok_s1_cudnn --config=configs/titok.py:l32_stage1 --workload=train --batch_size=64 \
                     --config.model.attention_impl=cudnn
bench titok_s2_cudnn --config=configs/titok.py:l32_stage2 --workload=train --batch_size=32 \
                     --config.model.attention_impl=cudnn
# GPT-B decoding with cuDNN's fused attention (one kernel per layer and token, the cache's
# filled length as its mask), in chunks, and the B-L decode of its samples with it too
bench gpt_b_cudnn    --config=configs/gpt_gigatok.py:b --workload=sample --batch_size=64 \
                     --tokenizer_config=benchmarks/gigatok_b_l_cudnn.py \
                     --config.model.attention_impl=cudnn \
                     --config.sampling_precision=bfloat16
# GPT-B decoding on the whole KV cache at every token (one loop; the default reads it in chunks)
bench gpt_b_whole    --config=configs/gpt_gigatok.py:b --workload=sample --batch_size=64 \
                     --tokenizer_config=configs/gigatok_b_l.py --config.sampling.cache_chunk=0 \
                     --config.sampling_precision=bfloat16
}

targets
if [[ -n "${TARGETS:-}" ]]; then read -ra SELECTED <<< "$TARGETS"; else SELECTED=("${NAMES[@]}"); fi
for name in "${SELECTED[@]}"; do
  [[ -n ${ARGS[$name]+x} ]] || echo "== $name: unknown target (one of: ${NAMES[*]})"
done
if [[ -n "${WARM:-}" ]]; then
  echo "== compiling the targets (--compile_only, $OUT/*.compile.log)"
  for name in "${SELECTED[@]}"; do
    [[ -n ${ARGS[$name]+x} ]] && eval "compile_one $name ${ARGS[$name]}"
  done
  wait
  echo "== compiled after $SECONDS s"
fi
for name in "${SELECTED[@]}"; do
  [[ -n ${ARGS[$name]+x} ]] && eval "time_one $name ${ARGS[$name]}"
done
