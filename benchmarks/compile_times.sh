#!/usr/bin/env bash
# Start-up cost of every full-size recipe (issue 20 A): `tok1d bench --compile_only` on the
# recipe's train step, twice per recipe, first with an empty persistent compilation cache
# ("cold") and then with the cache the first run filled ("warm": what a restarted or resumed
# run pays). CPU is enough: XLA's front end and HLO passes dominate on every backend.
#
#   bash benchmarks/compile_times.sh OUT_DIR     # OUT_DIR/compile.jsonl, OUT_DIR/*.log, table
#
# RECIPES="gigatok.py:xl_xxl titok.py:l32_stage1" runs a subset; WARM=0 skips the warm runs;
# TABLE_ONLY=1 prints the table of what OUT_DIR holds;
# BATCH (default 8) is the global batch compiled for (compile time barely depends on it);
# PYTHON (default python3). Prints the markdown table of benchmarks/RESULTS.md at the end:
# seconds of wall time, with the process's CPU seconds in parentheses (the steadier number on
# a shared machine), and the load average when each run ended.
set -uo pipefail
OUT=${1:?usage: benchmarks/compile_times.sh OUT_DIR}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BATCH=${BATCH:-8}
ALL="titok.py:l32_stage1 titok.py:l32_stage2 titok.py:bl64 titok.py:bl64_vae
gigatok.py:s_s gigatok.py:s_b gigatok.py:b_l gigatok.py:b_l_dino_disc gigatok.py:xl_xxl
gigatok.py:s_s_2d gigatok.py:s_b_2d gigatok.py:b_l_2d maskgit_titok.py:l32 maskgit_titok.py:s128
gpt_gigatok.py:b gpt_gigatok.py:l gpt_gigatok.py:xl gpt_gigatok.py:xxl rar.py:b rar.py:xxl"

[[ ${TABLE_ONLY:-0} == 1 ]] && ALL="" RECIPES=""  # TABLE_ONLY=1: the table of OUT_DIR only
for recipe in ${RECIPES:-$ALL}; do
  name=${recipe/.py:/_}
  cache="$OUT/cache/$name"
  rm -rf "$cache"
  for run in cold warm; do
    if [[ $run == warm && ${WARM:-1} == 0 ]]; then continue; fi
    echo "== $recipe ($run cache; load: $(cut -d' ' -f1-3 /proc/loadavg))"
    start=$(date +%s.%N)
    TOK1D_COMPILATION_CACHE="$cache" $PY -m tok1d.cli.bench --config="configs/$recipe" \
      --workload=train --batch_size="$BATCH" --compile_only \
      --out="$OUT/compile.jsonl.tmp" > "$OUT/$name.$run.log" 2>&1
    rc=$?
    wall=$(echo "$(date +%s.%N) - $start" | bc)
    if [[ $rc == 0 ]]; then
      $PY - "$OUT" "$recipe" "$run" "$wall" <<'PYEOF'
import json, os, sys
out, recipe, run, wall = sys.argv[1:]
with open(os.path.join(out, "compile.jsonl.tmp")) as f:
    row = json.loads(f.read().splitlines()[-1])
load = open("/proc/loadavg").read().split()[:3]
row.update(recipe=recipe, cache=run, process_s=float(wall), load=" ".join(load))
with open(os.path.join(out, "compile.jsonl"), "a") as f:
    f.write(json.dumps(row) + "\n")
print(f"   trace+lower {row['lower_s']:.1f} s, XLA {row['compile_s']:.1f} s, start to compiled "
      f"{row['startup_s']:.1f} s ({row['startup_cpu_s']:.1f} CPU s), process {float(wall):.1f} s")
PYEOF
    else
      echo "FAILED (see $OUT/$name.$run.log)"; tail -n 3 "$OUT/$name.$run.log"
    fi
  done
done
rm -f "$OUT/compile.jsonl.tmp"
[[ -f "$OUT/compile.jsonl" ]] || { echo "no measurements in $OUT"; exit 1; }

$PY - "$OUT/compile.jsonl" <<'PYEOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print("| recipe | batch | TFLOP/step | cold: trace+lower | cold: XLA | cold: start to compiled "
      "| warm: trace+lower | warm: XLA (cache load) | warm: start to compiled "
      "| load (1 min avg) cold / warm |")
print("|---|---|---|---|---|---|---|---|---|---|")
by = {}
for r in rows:
    by.setdefault(r["recipe"], {})[r["cache"]] = r


def f(r, wall, cpu):
    """wall s (CPU s)"""
    if r is None or r.get(wall) is None:
        return "-"
    return f"{r[wall]:.1f} ({r[cpu]:.1f})" if r.get(cpu) is not None else f"{r[wall]:.1f}"


for recipe, runs in by.items():
    c, w = runs.get("cold"), runs.get("warm")
    tflop = (c or w)["tflop_per_step"]
    load = lambda r: "-" if r is None else r["load"].split()[0]  # noqa: E731
    print(f"| {recipe} | {(c or w)['batch']} | {'-' if tflop is None else f'{tflop:.2f}'} | "
          f"{f(c, 'lower_s', 'lower_cpu_s')} | {f(c, 'compile_s', 'compile_cpu_s')} | "
          f"{f(c, 'startup_s', 'startup_cpu_s')} | {f(w, 'lower_s', 'lower_cpu_s')} | "
          f"{f(w, 'compile_s', 'compile_cpu_s')} | "
          f"{f(w, 'startup_s', 'startup_cpu_s')} | {load(c)} / {load(w)} |")
PYEOF
