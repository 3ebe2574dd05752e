#!/usr/bin/env bash
# Grow the tiny pool from 3 to 4 experts and measure it with the synthetic ground truth (issue 16):
#   base site:  3 families of clips -> prepare (K=3) -> experts 1-3 + the router at stage 2 -> folder "three"
#   new site:   clips of a 4th family -> data.prepare mode=extend (expert 4, the old data untouched)
#               -> only expert 4 and the 4-way router train -> python -m ddm.pool add -> folder "four"
#               (and the other 4-way router: the 3-way one fine-tuned with a grown head -> folder "four-ft";
#               and the 3-way router kept, gated by the 4-way one's new-vs-old -> folder "four-gated")
#   evaluation: held-out prompts of all 4 families (a seed never trained on), DDM top-1, three vs four,
#               ground-truth accuracy per family group with SEs and the paired difference on the old families.
# Outputs go to $DDM_GROW_DIR (default ./grow_out); rerunning reuses what is done. Reports: grow_report_*.md.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo_root/launch/setup_env.sh"
cd "$repo_root"

out="$(mkdir -p "${DDM_GROW_DIR:-$repo_root/grow_out}" && cd "${DDM_GROW_DIR:-$repo_root/grow_out}" && pwd)"
export DDM_ROOT="$out" WANDB_MODE="${WANDB_MODE:-disabled}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
clips="${DDM_GROW_CLIPS:-150}"          # base site: training clips over 3 families
new_clips="${DDM_GROW_NEW_CLIPS:-50}"   # new site: clips of the 4th family (what one base family has)
n="${DDM_GROW_EVAL_VIDEOS:-200}"        # held-out prompts per folder, round-robin over the 4 families
gen_steps="${DDM_GROW_GEN_STEPS:-30}"   # Euler steps of the evaluation's samples (recorded in the folders)
read -r -a extra <<<"${DDM_GROW_OVERRIDES:-}"   # Hydra overrides for every training job
common=(experiment=tiny stage=stage2 ${extra[@]+"${extra[@]}"})
gen=(--size 32 --num-frames 17 --shape-scale 2)
logs="$out/logs"; mkdir -p "$logs"
start=$(date +%s)
step() { printf '\n[grow %4ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }
run() {  # run <log name> <command...>: output to logs/<name>.log, its tail on failure
  local name="$1"; shift
  "$@" >"$logs/$name.log" 2>&1 || { echo "  $name FAILED; last lines of $logs/$name.log:" >&2; tail -n 30 "$logs/$name.log" >&2; return 1; }
}
train() {  # train <log name> <run dir> <module> <overrides...> (skipped when its export exists)
  local name="$1" dir="$2"; shift 2
  [ -f "$dir/export/master.safetensors" ] && { echo "  $name: done before"; return 0; }
  run "$name" python -m "$@" && echo "  $name: trained -> $dir/export"
}

step "1/6 base site: $clips clips of 3 families, prepared into K=3 clusters"
[ -f "$out/raw/.complete" ] || { run synthetic python -m data.synthetic --out "$out/raw" --num-videos "$clips" --seed 0 "${gen[@]}"; touch "$out/raw/.complete"; }
run prepare python -m data.prepare input="$out/raw" recipe=tiny vae=pixel text=tiny num_experts=3 \
  cluster.fine_clusters=24 encode.stage=stage2 progress=false

step "2/6 experts 1-3 and the 3-way router (two lanes, one per core) -> models/three"
base="$out/runs/base"
( train expert1 "$base/expert1/stage2" train.expert "${common[@]}" experiment_name=base expert=1 &&
  train expert3 "$base/expert3/stage2" train.expert "${common[@]}" experiment_name=base expert=3 ) & lane=$!
train expert2 "$base/expert2/stage2" train.expert "${common[@]}" experiment_name=base expert=2
train router3 "$base/router/stage2" train.router "${common[@]}" experiment_name=base
wait "$lane"
[ -f "$out/models/three/model_index.json" ] || run export_three python -m ddm.assemble --runs "$base" \
  --out "$out/models/three" --stages stage2 --num-steps "$gen_steps" --cfg-scale 3

step "3/6 new site: $new_clips clips of a 4th family -> data.prepare mode=extend (expert 4)"
[ -f "$out/new/.complete" ] || { run synthetic_new python -m data.synthetic --out "$out/new" --num-videos "$new_clips" \
  --seed 2 --families 1 --first-family 3 "${gen[@]}"; touch "$out/new/.complete"; }
run extend python -m data.prepare mode=extend input="$out/new" recipe=tiny vae=pixel text=tiny num_experts=3 \
  encode.stage=stage2 progress=false
grep -E "\[extend\] [0-9]+ of" "$logs/extend.log" | sed -E 's/^.*\[extend\]/ /' || true
work="$out/prep/extend/expert_4"

step "4/6 only expert 4 and the 4-way router train (on $work) -> ddm.pool add -> models/four"
grow="$out/runs/grow"
text=(text.folder="$out/prep/tiny_text")  # the tiny text encoders data.prepare built in the base prep folder
train expert4 "$grow/expert4/stage2" train.expert "${common[@]}" experiment_name=grow expert=4 num_experts=4 \
  paths.data_dir="$work" "${text[@]}" & lane=$!
train router4 "$grow/router/stage2" train.router "${common[@]}" experiment_name=grow num_experts=4 \
  paths.data_dir="$work" "${text[@]}"
wait "$lane"
[ -f "$out/models/four/model_index.json" ] || run pool_add python -m ddm.pool add "$out/models/three" --runs "$grow" \
  --expert 4 --out "$out/models/four"
run verify python -m ddm.pool verify "$out/models/four" && sed 's/^/  /' "$logs/verify.log"
# the other 4-way router: the 3-way one fine-tuned, its head grown by a row (the same steps)
ft="$out/runs/grow-ft"; mkdir -p "$ft"; [ -e "$ft/expert4" ] || ln -s "$grow/expert4" "$ft/expert4"
train router4ft "$ft/router/stage2" train.router "${common[@]}" experiment_name=grow num_experts=4 \
  paths.data_dir="$work" "${text[@]}" run_dir="$ft/router/stage2" init_from="$base/router/stage2/export"
[ -f "$out/models/four-ft/model_index.json" ] || run pool_add_ft python -m ddm.pool add "$out/models/three" --runs "$ft" \
  --expert 4 --out "$out/models/four-ft"
# the third: the 3-way router kept as it is, the retrained 4-way one used only to tell new from old (gated)
[ -f "$out/models/four-gated/model_index.json" ] || run pool_add_gated python -m ddm.pool add "$out/models/three" \
  --runs "$grow" --expert 4 --out "$out/models/four-gated" --router gated

step "5/6 evaluate: $n held-out prompts of all 4 families (seed 1), DDM top-1, by the ground truth"
[ -f "$out/heldout/.complete" ] || { run heldout python -m data.synthetic --out "$out/heldout" --num-videos "$n" --seed 1 \
  --families 4 "${gen[@]}"; touch "$out/heldout/.complete"; }
evaluate=(python -m ddm.evaluate --groundtruth "$out/heldout" --num-videos "$n" --stage stage2 --batch-size 25
          --no-progress --metrics groundtruth --contact-sheet-rows 0)
( run eval_three "${evaluate[@]}" --model "three=$out/models/three:top1" --baseline three/top1 --out "$out/eval_three" &&
  run eval_four_ft "${evaluate[@]}" --model "four=$out/models/four-ft:top1" --baseline four/top1 --out "$out/eval_four_ft" ) & lane=$!
run eval_four "${evaluate[@]}" --model "four=$out/models/four:top1" --baseline four/top1 --out "$out/eval_four"
run eval_four_gated "${evaluate[@]}" --model "four=$out/models/four-gated:top1" --baseline four/top1 \
  --out "$out/eval_four_gated"
wait "$lane"

step "6/6 per family group: the new family and the old ones, three vs four (router retrained / fine-tuned / gated)"
for variant in four four_ft four_gated; do
  echo "  --- $variant"
  python -m ddm.eval.grow --heldout "$out/heldout" --three "$out/eval_three/metrics.json" \
    --four "$out/eval_$variant/metrics.json" --new-family 3 --out "$out/grow_report_$variant.md" | sed 's/^/  /'
done
echo "  reports: $out/grow_report_{four,four_ft,four_gated}.md (total $(( $(date +%s) - start )) s)"
