#!/usr/bin/env bash
# What a restarted tokenizer run pays before training (issue 20 A), measured on the real
# command: `python -m tok1d.main` on each recipe (the demo images at the recipe's size, global
# batch 1, random frozen networks), stopped with SIGTERM as soon as its first step has started
# (it finishes that step and saves a checkpoint), then the same command again, RUNS times in
# all. Run 0 starts from nothing (cold compilation cache unless CACHE is warm already); every
# later run is a resume from the previous run's checkpoint with a warm cache.
#
#   bash benchmarks/resume_times.sh OUT_DIR      # OUT_DIR/NAME.RUN.log, then the table
#
# The recipe's frozen teacher is loaded from a converted directory of random weights written
# once (benchmarks/random_teacher.py, OUT_DIR/frozen/NAME), as a real run loads the converted
# teacher; the perceptual networks and discriminator are drawn at random (a second or two).
# RECIPES (default "titok.py:l32_stage1 gigatok.py:b_l"; tokenizer recipes), RUNS (default 3),
# PYTHON (default python3), FLAGS (more tok1d.main flags, e.g. --config.checkpoint.compress=True). Each recipe gets its own compilation cache, OUT_DIR/cache/NAME, and
# workdir, OUT_DIR/NAME (a full-size state: several GB per checkpoint). Columns: the train
# step's tracing + compiling (or loading from the cache), split into trace + lowering and
# XLA's part, which runs beside creating or restoring the state (its own column), and the
# seconds from the process start to that step's start, all from the run's "step N started"
# line; building the frozen networks and the data pipeline are in the last.
set -uo pipefail
OUT=${1:?usage: benchmarks/resume_times.sh OUT_DIR}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
RUNS=${RUNS:-3}
rows=()
for recipe in ${RECIPES:-titok.py:l32_stage1 gigatok.py:b_l}; do
  name=${recipe/.py:/_}
  name=${name%.py}
  rm -rf "${OUT:?}/$name" "$OUT/cache/$name"
  # the teacher as a real run loads it: a converted directory (random weights), not drawn anew
  teacher=$($PY benchmarks/random_teacher.py "configs/$recipe" "$OUT/frozen/$name" | tail -n 1) \
    || { echo "$recipe: could not write its random teacher" >&2; exit 1; }
  for ((run = 0; run < RUNS; run++)); do
    log="$OUT/$name.$run.log"
    TOK1D_COMPILATION_CACHE="$OUT/cache/$name" $PY -m tok1d.main --config="configs/$recipe" \
      --workdir="$OUT/$name" --config.data.name=demo --config.data.demo_size=64 \
      --config.data.num_workers=0 --config.batch_size=1 --config.eval_batch_size=1 \
      --config.data.eval_examples=1 --config.teacher.allow_random_init=True \
      --config.perceptual.allow_random_init=True --config.discriminator.allow_random_init=True \
      --config.total_steps=1000000 --config.log_every_steps=1 $teacher ${FLAGS:-} > "$log" 2>&1 &
    pid=$!
    until grep -q " started: " "$log" 2>/dev/null || ! kill -0 $pid 2>/dev/null; do sleep 0.5; done
    kill -TERM $pid 2>/dev/null
    wait $pid
    line=$(grep -m1 " started: " "$log")
    if [[ -z $line ]]; then
      echo "$recipe run $run: no first step (see $log)" >&2
      tail -5 "$log" >&2
      exit 1
    fi
    step_s=$(sed -E 's/.* in ([0-9.]+) s beside.*/\1/' <<< "$line")
    parts=$(sed -E 's/.*trace \+ lowering ([0-9.]+) s, XLA ([0-9.]+) s; state [a-z]+ in ([0-9.]+) s;.*/\1 | \2 | \3/' <<< "$line")
    age_s=$(sed -E 's/.*, ([0-9.]+) s after the process started.*/\1/' <<< "$line")
    kind=$([[ $run == 0 ]] && echo "start" || echo "resume")
    rows+=("| $recipe | $run ($kind) | $step_s | $parts | $age_s |")
    echo "== $recipe run $run: $line"
  done
done
echo
echo "| recipe | run | train step compiled (s) | of which trace + lowering (s) | of which XLA (s) | state created or restored, beside it (s) | process start to first step (s) |"
echo "|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
