#!/usr/bin/env bash
# A single-expert probe, in one command: retrain one expert of a finished demo with Hydra overrides, sample it
# alone (oracle routing) on the held-out prompts of its own scene family, and score the videos with the
# synthetic ground truth. The probe tables of docs/bench/demo.md were measured this way.
#   DDM_DEMO_DIR=demo_out bash launch/probe_expert.sh NAME [hydra overrides for train.expert...]
#   e.g. bash launch/probe_expert.sh lr1e2 recipe.stage2.lr=1e-2
# The demo's data (prep/), its other experts and router (runs/tiny/) and its held-out set (heldout_n*/) are
# reused, read-only. Outputs: $DDM_DEMO_DIR/probes/NAME/ (training run, model folder, samples, gt.txt).
# DDM_PROBE_EXPERT: the expert to retrain (default 1). DDM_PROBE_PROMPTS: heldout (default; the held-out
# captions of its family) or train (its own training captions). DDM_PROBE_CFG / DDM_PROBE_STEPS: sampling
# guidance and Euler steps (default 3 and 30, the demo's). DDM_PROBE_MAX_PROMPTS: at most this many (60).
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo_root/launch/setup_env.sh"
cd "$repo_root"

[ $# -ge 1 ] || { echo "usage: DDM_DEMO_DIR=DIR bash launch/probe_expert.sh NAME [train.expert overrides...]" >&2; exit 2; }
name="$1"; shift
demo="$(cd "${DDM_DEMO_DIR:-$repo_root/demo_out}" 2>/dev/null && pwd)" \
  || { echo "no demo folder ${DDM_DEMO_DIR:-$repo_root/demo_out}: run bash launch/demo.sh first" >&2; exit 2; }
k="${DDM_PROBE_EXPERT:-1}"
which="${DDM_PROBE_PROMPTS:-heldout}"
case "$which" in heldout|train) ;; *) echo "DDM_PROBE_PROMPTS must be heldout or train, got '$which'" >&2; exit 2 ;; esac
runs="$demo/runs/tiny"
heldout="$(ls -d "$demo"/heldout_n*/ 2>/dev/null | head -n 1 || true)"
for need in "$demo/prep/assignments.parquet" "$runs/router/stage2/export/master.safetensors" "${heldout:-$demo/heldout_n*}"; do
  [ -e "$need" ] || { echo "$need is missing: finish bash launch/demo.sh in $demo first" >&2; exit 2; }
done
export DDM_ROOT="$demo" WANDB_MODE="${WANDB_MODE:-disabled}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
out="$demo/probes/$name"; mkdir -p "$out"
echo "[probe $name] expert $k retrained with: ${*:-(the recipe)} -> $out"
# A name is one recipe: reusing it with other overrides would score the old expert under the new label.
if [ -f "$out/overrides.txt" ] && [ "$(cat "$out/overrides.txt")" != "expert=$k $*" ]; then
  echo "probe $name was trained as '$(cat "$out/overrides.txt")', not 'expert=$k $*': pick another name or remove $out" >&2
  exit 2
fi
echo "expert=$k $*" >"$out/overrides.txt"

if [ ! -f "$out/train/tiny/expert$k/stage2/export/master.safetensors" ]; then
  TIMEFORMAT="%R %U %S"
  { time python -m train.expert experiment=tiny expert="$k" stage=stage2 paths.runs_dir="$out/train" "$@" \
      >"$out/train.log" 2>&1; } 2>"$out/train.time" \
    || { echo "[probe $name] training FAILED; last lines of $out/train.log:" >&2; tail -n 30 "$out/train.log" >&2; exit 1; }
  awk '{printf "[probe] trained in %.0f s wall, %.0f s CPU\n", $1, $2 + $3}' "$out/train.time"
else
  echo "[probe] trained before: $out/train"
fi
# The model folder: this probe's expert in slot k, the demo's other experts and router beside it (never used:
# routing is the oracle), so the folder is a valid DDM of one experiment.
mkdir -p "$out/runs"
for role in $(ls "$runs"); do
  case "$role" in expert*|router) mkdir -p "$out/runs/$role"; ln -sfn "$runs/$role/stage2" "$out/runs/$role/stage2" ;; esac
done
ln -sfn "$out/train/tiny/expert$k/stage2" "$out/runs/expert$k/stage2"
python -m ddm.assemble --runs "$out/runs" --stages stage2 --out "$out/model" --num-steps "${DDM_PROBE_STEPS:-30}" \
  --cfg-scale "${DDM_PROBE_CFG:-3}" --link --overwrite >"$out/assemble.log" 2>&1 \
  || { tail -n 30 "$out/assemble.log" >&2; exit 1; }

# The prompts: the held-out (or training) captions of the family most of expert k's clips belong to.
python - "$demo" "$k" "$which" "$heldout" "${DDM_PROBE_MAX_PROMPTS:-60}" "$out/prompts.txt" <<'PY'
import collections, sys
from pathlib import Path
import pyarrow.parquet as pq
from ddm.eval.groundtruth import attributes_of, read_manifest
demo, k, which, heldout, most, out = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6]
expert_of = {r["key"]: r["expert"] for r in pq.read_table(demo / "prep" / "assignments.parquet").to_pylist()}
mine = [r["caption"] for r in pq.read_table(demo / "prep" / "manifest.parquet").to_pylist()
        if expert_of.get(r["key"]) == k and r["kind"] == "video"]
if not mine:
    raise SystemExit(f"expert {k} has no clips in {demo / 'prep'}")
family, count = collections.Counter(attributes_of(c).family for c in mine).most_common(1)[0]
prompts = mine if which == "train" else [r["text"] for r in read_manifest(heldout)
                                        if r.get("kind", "video") == "video" and attributes_of(r).family == family]
Path(out).write_text("\n".join(prompts[:most]) + "\n")
print(f"[probe] expert {k}: family {family} ({count} of its {len(mine)} clips); {min(len(prompts), most)} {which} prompts")
PY
samples="$out/samples_$which"
rm -rf "$samples"
python -m ddm.generate --model "$out/model" --prompts "$out/prompts.txt" --strategy oracle --expert "$k" \
  --seed 100 --stage stage2 --no-gif --batch-size 20 --out "$samples" >"$out/generate.log" 2>&1 \
  || { tail -n 30 "$out/generate.log" >&2; exit 1; }
python -m ddm.eval.groundtruth "$samples" --manifest "$demo/raw" | tee "$samples/gt.txt"
