#!/usr/bin/env bash
# The whole DDM pipeline, tiny, on CPU, in one command:
#   synthetic clips -> prepare (ingest, embed, balanced clustering into K=3, shards at two stages)
#   -> 3 experts trained as independent processes, stage 2 then stage 3 (weights-only from stage 2)
#   -> the router (its own job, never loads an expert) -> the compute-matched monolith
#   -> a Paris-style model folder -> t2v and i2v samples with the routed sampler -> evaluation report.
# Rerunning reuses everything already done. Outputs go to $DDM_DEMO_DIR (default: ./demo_out).
# DDM_DEMO_PROFILE=short runs a smaller version (fewer clips and steps; what the test suite runs);
# DDM_DEMO_PROFILE=long trains longer and wider (4.5x the stage-2 steps, experts of width 128; under 30 minutes):
# the profile whose DDM reaches the colour target and follows the direction word (docs/bench/demo.md).
# DDM_DEMO_PROFILE=xl: 9x the stage-2 steps at width 128 (~50 minutes on 2 cores).
# The width-128 profiles train in bf16 autocast where the CPU multiplies bf16 natively (AVX512-BF16 or AMX:
# ~13 % faster per step, the same colour); DDM_DEMO_PRECISION overrides (32-true, bf16-mixed).
# DDM_DEMO_ROUTER=blind trains Paris's text-blind router instead of the tiny recipe's text-aware one
# (recipe.router.use_t5: it reads the caption's T5 tokens).
# DDM_DEMO_CLIPS sets the number of training clips; DDM_DEMO_OVERRIDES adds Hydra overrides to the
# expert and monolith jobs; DDM_DEMO_PRINT_JOBS=1 prints the overrides each job would get and stops.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo_root/launch/setup_env.sh"
cd "$repo_root"

demo="$(mkdir -p "${DDM_DEMO_DIR:-$repo_root/demo_out}" && cd "${DDM_DEMO_DIR:-$repo_root/demo_out}" && pwd)"
export DDM_ROOT="$demo"            # paths.root_dir: prep/ and runs/ go here
export WANDB_MODE="${WANDB_MODE:-disabled}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"   # one thread per process: two training lanes, one per core
profile="${DDM_DEMO_PROFILE:-full}"
K=3
model_args=()  # expert and monolith only (the router has its own model)
case "$profile" in  # full: the tiny recipe's own schedule (conf/recipe/tiny.yaml)
  full)  clips=150; gen_steps=30; common=(experiment=tiny) ;;
  long)  clips=150; gen_steps=30  # 4.5x the stage-2 steps and experts twice as wide (docs/bench/demo.md)
         common=(experiment=tiny recipe.stage2.max_steps=1800 recipe.router.max_steps=1200)
         model_args=(+model.overrides.hidden_size=128 +model.overrides.num_heads=4) ;;
  xl)    clips=150; gen_steps=30  # 9x the stage-2 steps, width 128 (docs/bench/demo.md, "The compute curve")
         common=(experiment=tiny recipe.stage2.max_steps=3600)
         model_args=(+model.overrides.hidden_size=128 +model.overrides.num_heads=4) ;;
  short) clips=45;  gen_steps=4
         common=(experiment=tiny recipe.stage2.max_steps=8 recipe.stage3.max_steps=4 recipe.router.max_steps=10
                 recipe.router.val_every_n_steps=10) ;;
  *) echo "DDM_DEMO_PROFILE must be full, long, xl or short, got '$profile'" >&2; exit 2 ;;
esac
clips="${DDM_DEMO_CLIPS:-$clips}"              # training clips (all families)
if [ ${#model_args[@]} -gt 0 ]; then  # width 128: matmuls dominate a step, and bf16 ones run ~2x on such CPUs
  native_bf16=$(python -c "import torch; print(int(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))")
  precision="${DDM_DEMO_PRECISION:-$([ "$native_bf16" = 1 ] && echo bf16-mixed || echo 32-true)}"
else
  precision="${DDM_DEMO_PRECISION:-32-true}"  # width 64: bf16 autocast saves nothing (46 vs 47 s per expert)
fi
model_args+=(trainer.precision="$precision")
# extra Hydra overrides for the expert and monolith jobs, e.g. DDM_DEMO_OVERRIDES="optim.schedule=cosine"
read -r -a extra_args <<<"${DDM_DEMO_OVERRIDES:-}"
expert_args=(${model_args[@]+"${model_args[@]}"} ${extra_args[@]+"${extra_args[@]}"})
case "${DDM_DEMO_ROUTER:-text}" in
  text)  router_args=() ;;                 # the tiny recipe's router reads the caption (its T5 tokens)
  blind) router_args=(use_text=false use_t5=false) ;;   # Paris's router: x_t and t only
  *) echo "DDM_DEMO_ROUTER must be text or blind, got '$DDM_DEMO_ROUTER'" >&2; exit 2 ;;
esac
if [ "${DDM_DEMO_PRINT_JOBS:-0}" = 1 ]; then  # the Hydra overrides each job gets, then stop (tests/test_demo.py)
  printf 'expert:'; printf ' %q' "${common[@]}" ${expert_args[@]+"${expert_args[@]}"}; echo
  printf 'router:'; printf ' %q' "${common[@]}" ${router_args[@]+"${router_args[@]}"}; echo
  exit 0
fi
# Shapes drawn at twice the generator's default radius: at the 16 px the experts train at, a default shape is
# 3-4 px across, too few pixels for the tiny models to learn its colour in minutes (docs/bench/demo.md).
shape_scale="${DDM_DEMO_SHAPE_SCALE:-2}"
start=$(date +%s)
step() { printf '\n\033[1m[demo %4ss] %s\033[0m\n' "$(( $(date +%s) - start ))" "$*"; }
logs="$demo/logs"; mkdir -p "$logs"

# Runs one step's command with its output in logs/<name>.log; prints the log lines matching <pattern> (none if
# empty) on success, and on failure the log's tail, then stops the demo (fail fast, at the step that failed).
quiet() {  # quiet <log name> <pattern> <command...>
  local name="$1" pattern="$2"; shift 2
  if "$@" >"$logs/$name.log" 2>&1; then
    if [ -n "$pattern" ]; then grep -E "$pattern" "$logs/$name.log" | sed -E 's/^\[[^]]*\]\[[^]]*\]\[[A-Z]+\] - //; s/^/  /' || true; fi
  else
    echo "  $name FAILED (exit $?); last lines of $logs/$name.log:" >&2; tail -n 30 "$logs/$name.log" >&2; exit 1
  fi
}

# Runs one training job (its own process) unless its export exists; its output goes to a log file. Wall and
# CPU seconds are printed: on a machine shared with other work, CPU seconds are what an idle core would take.
train_job() {  # train_job <log name> <run dir> <module> <overrides...>
  local name="$1" run_dir="$2" module="$3"; shift 3
  if [ -f "$run_dir/export/master.safetensors" ]; then echo "  $name: done before ($run_dir/export)"; return 0; fi
  local TIMEFORMAT="%R %U %S" took
  if { time python -m "$module" "$@" >"$logs/$name.log" 2>&1; } 2>"$logs/$name.time"; then
    took=$(awk '{printf "%.0f s wall, %.0f s CPU", $1, $2 + $3}' "$logs/$name.time")
    echo "  $name: trained in $took -> $run_dir/export"
  else
    echo "  $name FAILED; last lines of $logs/$name.log:" >&2; tail -n 30 "$logs/$name.log" >&2; return 1
  fi
}
runs="$demo/runs/tiny"

step "1/7 synthetic data set: $clips clips of moving shapes with captions -> $demo/raw"
if [ ! -f "$demo/raw/.complete" ]; then
  # 32 px, 17 frames: enough for both stages (16 and 24 px, 9-frame centred windows) at an eighth of the pixels
  quiet synthetic "" python -m data.synthetic --out "$demo/raw" --num-videos "$clips" --seed 0 --size 32 \
    --num-frames 17 --shape-scale "$shape_scale"
  touch "$demo/raw/.complete"
fi

step "2/7 prepare: ingest -> embed -> balanced clustering into K=$K -> shards (stage2 16 px, stage3 24 px)"
quiet prepare_stage2 '\[data.prepare\]\[INFO\] - \[(cluster|encode)\] ' python -m data.prepare input="$demo/raw" recipe=tiny vae=pixel \
  text=tiny num_experts=$K cluster.fine_clusters=24 encode.stage=stage2 progress=false
quiet prepare_stage3 '\[data.prepare\]\[INFO\] - \[encode\] ' python -m data.prepare input="$demo/raw" recipe=tiny vae=pixel text=tiny \
  num_experts=$K cluster.fine_clusters=24 encode.stage=stage3 steps='[encode]' progress=false

step "3-4/7 training: $K experts, the router and the monolith — independent processes in two lanes, one per core"
echo "  lane 1: the monolith, stage 2 then stage 3 (its compute matched to the $K experts + the router)"
echo "  lane 2: experts 1..$K at stage 2, the router (it needs no expert), experts 1..$K at stage 3"
echo "  (stage 3 starts weights-only from each model's own stage-2 export; one router serves both stages)"
lane_monolith() {
  train_job monolith_stage2 "$runs/monolith/stage2" train.expert "${common[@]}" ${expert_args[@]+"${expert_args[@]}"} expert=all compute_match=true \
    stage=stage2 || return 1
  train_job monolith_stage3 "$runs/monolith/stage3" train.expert "${common[@]}" ${expert_args[@]+"${expert_args[@]}"} expert=all compute_match=true \
    stage=stage3
}
lane_ddm() {
  local k
  for k in $(seq 1 $K); do
    train_job "expert${k}_stage2" "$runs/expert$k/stage2" train.expert "${common[@]}" ${expert_args[@]+"${expert_args[@]}"} expert=$k stage=stage2 || return 1
  done
  train_job router "$runs/router/stage2" train.router "${common[@]}" ${router_args[@]+"${router_args[@]}"} \
    stage=stage2 || return 1
  for k in $(seq 1 $K); do
    train_job "expert${k}_stage3" "$runs/expert$k/stage3" train.expert "${common[@]}" ${expert_args[@]+"${expert_args[@]}"} expert=$k stage=stage3 || return 1
  done
}
lane_monolith & mono_pid=$!
lane_ddm & ddm_pid=$!
failed=0
wait "$ddm_pid" || failed=1
wait "$mono_pid" || failed=1
[ "$failed" = 0 ] || exit 1
grep -A7 "compute ledger" "$logs/monolith_stage2.log" 2>/dev/null | sed 's/^/  /' || true

step "5/7 export the Paris-style model folders"
models="$demo/models"
# Sampling defaults recorded in the folders: guidance 3 (Paris' 7.5 over-saturates models this small).
sampling=(--num-steps "$gen_steps" --cfg-scale 3)
[ -f "$models/ddm/model_index.json" ] || quiet export_ddm "" python -m ddm.assemble --runs "$runs" --out "$models/ddm" \
  "${sampling[@]}"
[ -f "$models/monolith/model_index.json" ] || quiet export_monolith "" python -m ddm.assemble --runs "$runs" --monolith \
  --out "$models/monolith" "${sampling[@]}"
echo "  $models/ddm (3 experts + router), $models/monolith"

step "6/7 sample with the routed sampler: text-to-video (top-2) and image-to-video"
python - "$demo" <<'PY'
import sys
from pathlib import Path
import pyarrow.parquet as pq
from PIL import Image
from ddm.video_io import read_video
demo = Path(sys.argv[1])
manifest = pq.read_table(demo / "prep" / "manifest.parquet").to_pylist()
videos = [r for r in manifest if r["kind"] == "video"]
(demo / "prompts.txt").write_text("\n".join(r["caption"] for r in videos[:4]) + "\n")
frames, _ = read_video(videos[0]["path"], frame_indices=[0])
Image.fromarray(frames[0]).save(demo / "i2v_first_frame.png")
PY
if [ -f "$demo/samples/.complete" ]; then
  echo "  done before ($demo/samples)"
else
  quiet generate_t2v '^\[ddm.generate\] .* written' python -m ddm.generate --model "$models/ddm" \
    --prompts "$demo/prompts.txt" --strategy topk --k 2 --seed 0 --trace --out "$demo/samples/t2v"
  quiet generate_i2v '^\[ddm.generate\] .* written' python -m ddm.generate --model "$models/ddm" \
    --prompt "$(head -n 1 "$demo/prompts.txt")" --image "$demo/i2v_first_frame.png" --strategy topk --k 2 --seed 0 \
    --out "$demo/samples/i2v"
  touch "$demo/samples/.complete"
fi

step "7/7 evaluate: DDM (top1, top2, full) vs the monolith on held-out captions, by the synthetic ground truth"
# N videos per run: SE of a prompt accuracy is sqrt(p(1-p)/N) <= 0.05 for every p when N >= 100.
eval_n="${DDM_DEMO_EVAL_VIDEOS:-$([ "$profile" = short ] && echo 6 || echo 100)}"
eval_stage="${DDM_DEMO_EVAL_STAGE:-stage2}"
eval_frames=$(python -c "import sys; from pathlib import Path; from ddm.evaluate import ModelSpec, trained_frames
print(trained_frames(ModelSpec('ddm', Path(sys.argv[1])), sys.argv[2]) or 9)" "$models/ddm" "$eval_stage")
n_families=$(python -c "import sys; from ddm.eval.groundtruth import families_in, read_manifest
print(len(families_in(read_manifest(sys.argv[1]))))" "$demo/raw")  # the training set's scene families
# The domain backbone (a small video CNN trained on real clips of its own seed) trains while the videos are
# generated; a held-out generator set (seed 1, never trained on) gives the prompts and the real clips.
domain_bb="$demo/eval_backbones/domain_backbone_${profile}_f${eval_frames}_s${shape_scale}.safetensors"
bb_pid=""
if [ ! -f "$domain_bb" ]; then
  bb_size=(); [ "$profile" = short ] && bb_size=(--num-clips 192 --epochs 6)  # seconds, for the test suite
  python -m ddm.eval.domain --out "$domain_bb" --num-frames "$eval_frames" --families "$n_families" --shape-scale "$shape_scale" ${bb_size[@]+"${bb_size[@]}"} \
    >"$logs/domain_backbone.log" 2>&1 & bb_pid=$!
fi
if [ ! -f "$demo/heldout_n$eval_n/.complete" ]; then
  quiet heldout "" python -m data.synthetic --out "$demo/heldout_n$eval_n" --num-videos $((2 * eval_n)) --seed 1 \
    --families "$n_families" --shape-scale "$shape_scale"
  touch "$demo/heldout_n$eval_n/.complete"
fi
evaluate=(python -m ddm.evaluate --groundtruth "$demo/heldout_n$eval_n" --num-videos "$eval_n" --stage "$eval_stage"
          --batch-size 25 --no-progress --out "$demo/eval")
# Generation, split over the two cores (each run has its own video folder, so the two never collide):
# DDM top-1 + top-2 in the background, DDM full + the monolith here (about equal work). Done once per N.
generated="$demo/eval/.generated_n$eval_n"
if [ ! -f "$generated" ]; then
  "${evaluate[@]}" --model "ddm=$models/ddm:top1,top2" --baseline ddm/top1 --metrics groundtruth \
    --contact-sheet-rows 0 >"$logs/evaluate_gen_a.log" 2>&1 & gen_pid=$!
  "${evaluate[@]}" --model "ddm=$models/ddm:full" --model "monolith=$models/monolith" --baseline monolith \
    --metrics groundtruth --contact-sheet-rows 0 >"$logs/evaluate_gen_b.log" 2>&1 \
    || { tail -n 30 "$logs/evaluate_gen_b.log" >&2; exit 1; }
  wait "$gen_pid" || { tail -n 30 "$logs/evaluate_gen_a.log" >&2; exit 1; }
  touch "$generated"
fi
if [ -n "$bb_pid" ]; then
  wait "$bb_pid" || { echo "  domain backbone FAILED:" >&2; tail -n 20 "$logs/domain_backbone.log" >&2; exit 1; }
fi
# The table: every video is reused; ground truth, motion and the domain FVD (with its real-vs-real floor).
"${evaluate[@]}" --model "ddm=$models/ddm:top1,top2,full" --model "monolith=$models/monolith" --baseline monolith \
  --metrics groundtruth,motion,domain_fvd --domain-backbone "$domain_bb" >"$logs/evaluate.log" 2>&1 \
  || { tail -n 30 "$logs/evaluate.log" >&2; exit 1; }

step "done in $(( $(date +%s) - start )) s — results (ground truth measured on each video; N=$eval_n per run)"
awk '/^\|/{p=1} p&&!/^\|/{exit} p' "$demo/eval/report.md"
cat <<EOF

  samples (t2v)   $demo/samples/t2v/
  samples (i2v)   $demo/samples/i2v/
  routing trace   $(ls "$demo"/samples/t2v/*trace*.png 2>/dev/null | head -n 1)
  report          $demo/eval/report.md
  contact sheet   $demo/eval/contact_sheet.png
  metrics         $demo/eval/metrics.json
  plots           $demo/eval/plots/
  model folders   $models/ddm  $models/monolith
  training runs   $runs/   (logs: $logs/)
EOF
