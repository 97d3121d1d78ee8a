#!/usr/bin/env bash
# One call on a lent GPU machine whose Python has jax / flax / optax / orbax but not tok1d's
# other dependencies: installs the wheels carried in .whl/ (if any; see targets.sh for the
# `pip download` line), then runs a PLAN of benchmarks/targets.sh and leaves at most six files
# in OUT_DIR (env.txt, session.log, bench.jsonl, compile.jsonl, cmdbuf.jsonl, logs.tgz with
# every target's log):
#
#   bash benchmarks/gpu_session.sh OUT_DIR [PLAN]
#
# PLAN (default "cmdbuf attn train"; then, budget allowing, a second call with "profile"), run
# in this order:
#   cmdbuf   GPT-B sampling timed four times: as the sampler decodes by default (the KV cache
#            read in chunks), with cuDNN's fused attention (GPT-B and the B-L decoding its
#            samples), on the whole cache at every token
#            (cache_chunk=0, the 2026-12-04 program), and by default with while loops and
#            conditionals recorded into CUDA graphs as well (XLA_FLAGS
#            --xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL); rows in cmdbuf.jsonl
#            (command and xla_flags tell them apart), logs under cmdbuf/
#   attn     TiTok-L-32 stage 1 (batch 64) with XLA's attention and with cuDNN's fused
#            attention, and stage 2 (batch 32) with cuDNN's (stage 2 with XLA's: 83.7 img/s on
#            2026-12-04): compiled three at a time, then timed
#   train    GigaTok B-L training at batch 16 with XLA's and with cuDNN's attention, and at 32:
#            compiled three at a time, then timed (not measured on 2026-12-04: its compile did
#            not finish under load)
#   targets  every other target, compiled three at a time, then timed
#   profile  3 profiled calls of TiTok-L-32 stage 2 and GPT-B sampling; their logs end with
#            where the device's time went (tok1d.cli.trace_summary). Stage 2 took 382 ms per
#            step where benchmarks/hlo_roofline.py expects about 240 (stage 1: 352 vs 394)
# BUDGET (default 560): seconds for the whole script. Each part has its own limit (cmdbuf 120 s
# for its first three runs and 60 s for the fourth, attn and train 190 s, targets 300 s,
# profile 150 s, less what is left of BUDGET), starts no target in its last 60 s (targets.sh
# DEADLINE; 20 s for the cmdbuf parts) and cuts any target process 10 s before its end.
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_session.sh OUT_DIR [PLAN]}
PLAN=${2:-cmdbuf attn train}
BUDGET=${BUDGET:-560}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "wheel install failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
LOGS=$(mktemp -d)
{
  nvidia-smi 2>&1 | head -n 12; nproc
  $PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, jax.devices())" 2>&1 | tail -n 1
} > "$OUT/env.txt"

part() {  # seconds for this part, the last seconds in which it starts no target, its log
  local seconds=$1 last=$2 dir=$3; shift 3  # folder, then targets.sh's environment
  local left=$((BUDGET - SECONDS))
  (( left < 30 )) && { echo "== budget spent: skipped $*"; return 0; }
  (( seconds > left )) && seconds=$left
  env "$@" DEADLINE=$((seconds - last)) TARGET_TIMEOUT=$((seconds - 10)) \
    timeout "$seconds" bash benchmarks/targets.sh "$dir"
}
CMDBUF="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL"

for p in $PLAN; do
  case $p in
    cmdbuf)  part 120 20 "$LOGS/cmdbuf" TARGETS="gpt_b_sample gpt_b_cudnn gpt_b_whole"
             part 60 20 "$LOGS/cmdbuf/graphs" TARGETS="gpt_b_sample" XLA_FLAGS="$CMDBUF" ;;
    attn)    part 190 60 "$LOGS" TARGETS="titok_s1_b64 titok_s1_cudnn titok_s2_cudnn" WARM=1 ;;
    train)   part 190 60 "$LOGS" TARGETS="gigatok_b16 gigatok_b16_cudnn gigatok_b32" WARM=1 ;;
    targets) part 300 60 "$LOGS" TARGETS="titok_s1_b64 titok_s2_b32 titok_s2_b64 titok_sample \
gigatok_encode gigatok_decode gpt_b_sample rar_b_sample" WARM=1 JOBS=3 ;;
    profile) part 150 60 "$LOGS" TARGETS="titok_s2_b32 gpt_b_sample" TOK1D_BENCH_STEPS=3 \
               TOK1D_BENCH_FLAGS="--profile=$LOGS/profile" ;;
    *) echo "unknown part $p (cmdbuf, attn, train, targets, profile)" >&2 ;;
  esac
done 2>&1 | tee "$OUT/session.log"
for f in bench.jsonl compile.jsonl; do [[ -f $LOGS/$f ]] && cp "$LOGS/$f" "$OUT/"; done
rows=$(cat "$LOGS"/cmdbuf/bench.jsonl "$LOGS"/cmdbuf/graphs/bench.jsonl 2>/dev/null)
[[ -n $rows ]] && echo "$rows" > "$OUT/cmdbuf.jsonl"
tar czf "$OUT/logs.tgz" -C "$LOGS" --exclude=profile .
echo "== done in $SECONDS s" | tee -a "$OUT/session.log"
