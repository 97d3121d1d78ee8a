#!/usr/bin/env bash
# One call on a lent GPU machine whose Python has jax / flax / optax / orbax but not tok1d's
# other dependencies: installs the wheels carried in .whl/ (if any; see targets.sh for the
# `pip download` line), then runs a PLAN of benchmarks/targets.sh and leaves at most six files
# in OUT_DIR (env.txt, session.log, bench.jsonl, compile.jsonl, cmdbuf.jsonl, logs.tgz with
# every target's log):
#
#   bash benchmarks/gpu_session.sh OUT_DIR [PLAN]
#
# PLAN (default "train cmdbuf attn"; then, budget allowing, a second call with "profile"), run
# in this order, the targets of each part in the order given:
#   train    GigaTok B-L training at batch 16 (never measured on a GPU: on 2026-12-04 its
#            compile did not finish beside others), compiled and timed alone
#   cmdbuf   GPT-B sampling timed three times: as the sampler decodes by default (the KV cache
#            read in chunks), with cuDNN's fused attention (GPT-B and the B-L decoding its
#            samples), and by default with while loops and conditionals recorded into CUDA
#            graphs as well (XLA_FLAGS --xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL: its
#            own compile, 90 s); rows in cmdbuf.jsonl (command and xla_flags tell them apart),
#            logs under cmdbuf/ (the whole-cache variant gpt_b_whole: 197.3 img/s on 12-04)
#   attn     TiTok-L-32 stage 2 (batch 32) and stage 1 (batch 64) with cuDNN's fused attention,
#            and stage 1 with XLA's (stage 2 with XLA's: 83.7 img/s on 2026-12-04): compiled
#            three at a time, then timed
#   targets  every other target (B-L @16 with cuDNN, @32, the codecs, samplers), compiled three
#            at a time, then timed
#   profile  3 profiled calls of GPT-B sampling and TiTok-L-32 stage 2; their logs end with
#            where the device's time went (tok1d.cli.trace_summary). Stage 2 took 382 ms per
#            step where benchmarks/hlo_roofline.py expects about 240 (stage 1: 352 vs 394)
# BUDGET (default 560): seconds for the whole script. Each part has its own limit (train 150 s,
# cmdbuf 110 s for its first two runs and 90 s for the graphs, attn 190 s, targets 300 s,
# profile 150 s, less what is left of BUDGET), starts no target in its last 60 s (targets.sh
# DEADLINE; 20 s for the cmdbuf parts; at most half the part) and cuts any target process 10 s
# before its end. The results are copied to OUT_DIR after every part (and on exit), so a cut
# call still returns what it measured.
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_session.sh OUT_DIR [PLAN]}
PLAN=${2:-train cmdbuf attn}
BUDGET=${BUDGET:-560}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
WHEELS="grain array_record dm-tree more-itertools portpicker clu ml_collections"
install=""
if compgen -G ".whl/*.whl" > /dev/null; then  # by name: pip picks this Python's wheels
  if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --find-links .whl --target /tmp/site $WHEELS 2>&1 | tail -n 3; then
    install="wheels: installed"
  else
    install="wheels: install FAILED"
  fi
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
LOGS=$(mktemp -d)
{
  nvidia-smi 2>&1 | head -n 12; nproc; $PY -V 2>&1; echo "${install:-wheels: none carried}"
  $PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, jax.devices())" 2>&1 | tail -n 1
  $PY -c "import tok1d.cli.bench; print('tok1d.cli.bench imports')" 2>&1 | tail -n 1
} > "$OUT/env.txt"

collect() {  # what the parts have measured so far -> OUT (at most six files)
  for f in bench.jsonl compile.jsonl; do [[ -f $LOGS/$f ]] && cp "$LOGS/$f" "$OUT/"; done
  local rows
  rows=$(cat "$LOGS"/cmdbuf/bench.jsonl "$LOGS"/cmdbuf/graphs/bench.jsonl 2>/dev/null)
  [[ -n $rows ]] && echo "$rows" > "$OUT/cmdbuf.jsonl"
  tar czf "$OUT/logs.tgz" -C "$LOGS" --exclude=profile . 2>/dev/null
  return 0
}
trap collect EXIT

part() {  # seconds for this part, the last seconds in which it starts no target, its log
  local seconds=$1 last=$2 dir=$3; shift 3  # folder, then targets.sh's environment
  local left=$((BUDGET - SECONDS))
  (( left < 30 )) && { echo "== budget spent: skipped $*"; return 0; }
  (( seconds > left )) && seconds=$left
  local deadline=$((seconds - last))
  (( deadline < seconds / 2 )) && deadline=$((seconds / 2))
  env "$@" DEADLINE=$deadline TARGET_TIMEOUT=$((seconds - 10)) \
    timeout "$seconds" bash benchmarks/targets.sh "$dir"
  (( $? == 124 )) && echo "== part cut after $seconds s: $*"
  collect
}
CMDBUF="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL"

for p in $PLAN; do
  case $p in
    train)   part 150 60 "$LOGS" TARGETS="gigatok_b16" ;;
    cmdbuf)  part 110 20 "$LOGS/cmdbuf" TARGETS="gpt_b_sample gpt_b_cudnn"
             part 90 20 "$LOGS/cmdbuf/graphs" TARGETS="gpt_b_sample" XLA_FLAGS="$CMDBUF" ;;
    attn)    part 190 60 "$LOGS" TARGETS="titok_s2_cudnn titok_s1_cudnn titok_s1_b64" WARM=1 ;;
    targets) part 300 60 "$LOGS" TARGETS="gigatok_b16_cudnn gigatok_b32 titok_s2_b32 \
titok_s2_b64 titok_sample gigatok_encode gigatok_decode rar_b_sample" WARM=1 JOBS=3 ;;
    profile) part 150 60 "$LOGS" TARGETS="gpt_b_sample titok_s2_b32" TOK1D_BENCH_STEPS=3 \
               TOK1D_BENCH_FLAGS="--profile=$LOGS/profile" ;;
    *) echo "unknown part $p (train, cmdbuf, attn, targets, profile)" >&2 ;;
  esac
done 2>&1 | tee "$OUT/session.log"
collect
echo "== done in $SECONDS s" | tee -a "$OUT/session.log"
