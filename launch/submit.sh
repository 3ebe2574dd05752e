#!/usr/bin/env bash
# Submit the whole DDM training DAG to SLURM and print the job ids:
#
#   experts stage2 (array 1-K) ──aftercorr──▶ experts stage3 (array 1-K) ──┐
#   monolith stage2 ──afterok──▶ monolith stage3 ──────────────────────────┼──afterok──▶ export + evaluate
#   router (starts at once; ROUTER_AFTER_EXPERTS=1: afterok on the experts) ┘
#
# aftercorr: array task k of stage 3 waits only for task k of stage 2, so a fast expert moves on without
# waiting for the others. afterok and aftercorr release a job only when its parent exits 0, which a training
# job does only when its stage is complete (or it was requeued): SIGTERM exits 143, USR1 without a requeue
# 138 (train/run.py, docs/slurm.md "Exit codes"). Every cluster-specific value comes from the cluster-settings file
# (launch/cluster.env, or DDM_CLUSTER_ENV=/path; see launch/cluster.env.example); a DDM_* variable or
# ROUTER_AFTER_EXPERTS already set in the caller's environment wins over the file. See docs/slurm.md.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<'EOF'
usage: launch/submit.sh [--dry-run] [--stages stage2,stage3] [--experts 1-K] [--no-monolith] [--no-router] [--no-eval]
       eval "$(launch/submit.sh --print-env)"   # export the settings for the Hydra submitit launcher

  --dry-run       print the sbatch commands instead of submitting (sbatch need not exist)
  --stages LIST   expert stages to submit, in order (default stage2,stage3); stage3 alone starts from the
                  stage-2 exports already on disk
  --experts SPEC  which experts (array spec, e.g. 2 or 1,3 or 1-3; default 1-K): resubmit only the failed ones
  --no-monolith   skip the compute-matched monolithic baseline (expert=all)
  --no-router     skip the router
  --no-eval       skip the export + evaluation job
  --print-env     print `export` lines for the non-empty settings (empty ones are unset) and exit
Settings: launch/cluster.env or DDM_CLUSTER_ENV=/path (copy launch/cluster.env.example).
ROUTER_AFTER_EXPERTS=1 chains the router after the last-stage experts.
EOF
}

die() {
  echo "[submit] error: $*" >&2
  exit 1
}

# ------------------------------------------------------------------------------------------- arguments
dry_run=0 print_env=0 stages_arg=stage2,stage3 experts_arg="" with_monolith=1 with_router=1 with_eval=1
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --stages) [ $# -ge 2 ] || die "--stages needs a value"; stages_arg="$2"; shift ;;
    --stages=*) stages_arg="${1#*=}" ;;
    --experts) [ $# -ge 2 ] || die "--experts needs a value"; experts_arg="$2"; shift ;;
    --experts=*) experts_arg="${1#*=}" ;;
    --no-monolith) with_monolith=0 ;;
    --no-router) with_router=0 ;;
    --no-eval) with_eval=0 ;;
    --print-env) print_env=1 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument '$1'" ;;
  esac
  shift
done

# ------------------------------------------------------------------------------------ cluster settings
cluster_env="${DDM_CLUSTER_ENV:-$repo_root/launch/cluster.env}"
[ -f "$cluster_env" ] || die "cluster settings not found at $cluster_env: copy launch/cluster.env.example to \
launch/cluster.env and edit it, or point DDM_CLUSTER_ENV at your own file"
caller_settings=()  # the caller's environment wins over the file
for name in $(compgen -e); do
  case "$name" in DDM_*|ROUTER_AFTER_EXPERTS) caller_settings+=("$name=${!name}") ;; esac
done
set -a  # everything the file sets is exported, so sbatch --export=ALL hands it to the job scripts
# shellcheck disable=SC1090
source "$cluster_env"
for setting in ${caller_settings[@]+"${caller_settings[@]}"}; do
  export "$setting"
done
set +a
export DDM_REPO="$repo_root"

is_count() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }
absolute() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }

for name in DDM_DATA_DIR DDM_RUNS_DIR DDM_EXPERIMENT_NAME DDM_NUM_EXPERTS DDM_SLURM_GPUS_PER_NODE; do
  [ -n "${!name:-}" ] || die "$name is not set in $cluster_env"
done
[[ "$DDM_EXPERIMENT_NAME" =~ ^[A-Za-z0-9_.-]+$ ]] || die "DDM_EXPERIMENT_NAME '$DDM_EXPERIMENT_NAME' must be one plain word (letters, digits, _ . -)"
K="$DDM_NUM_EXPERTS"
is_count "$K" || die "DDM_NUM_EXPERTS must be a positive integer, got '$K'"
for name in DDM_SLURM_GPUS_PER_NODE DDM_SLURM_NODES_PER_EXPERT DDM_SLURM_NODES_MONOLITH DDM_SLURM_NODES_ROUTER \
            DDM_SLURM_GPUS_ROUTER DDM_SLURM_GPUS_EVAL DDM_SLURM_CPUS_PER_TASK DDM_SLURM_SIGNAL_SECONDS DDM_SLURM_ARRAY_LIMIT; do
  [ -z "${!name:-}" ] || is_count "${!name}" || die "$name must be a positive integer, got '${!name}'"
done
[ -z "${DDM_SLURM_MEM_GB:-}" ] || [[ "$DDM_SLURM_MEM_GB" =~ ^[0-9]+$ ]] || die "DDM_SLURM_MEM_GB must be a whole number of GB (0 = all), got '$DDM_SLURM_MEM_GB'"
gpu_flag="${DDM_SLURM_GPU_FLAG:-gpus-per-node}"
case "$gpu_flag" in gpus-per-node|gres) ;; *) die "DDM_SLURM_GPU_FLAG must be gpus-per-node or gres, got '$gpu_flag'" ;; esac
router_after_experts="${ROUTER_AFTER_EXPERTS:-0}"
case "$router_after_experts" in 0|1) ;; *) die "ROUTER_AFTER_EXPERTS must be 0 or 1, got '$router_after_experts'" ;; esac

# Jobs run from the checkout, so relative paths are resolved here, against where submit.sh was run.
for name in DDM_DATA_DIR DDM_RUNS_DIR DDM_WEIGHTS_DIR DDM_LOG_DIR DDM_MODEL_DIR DDM_EVAL_DIR; do
  [ -z "${!name:-}" ] || export "$name=$(absolute "${!name}")"
done

if [ "$print_env" = 1 ]; then
  # Empty means "not set" in the settings file; unsetting it lets ${oc.env:NAME,default} use its default.
  for name in $(compgen -e); do
    case "$name" in
      DDM_*|ROUTER_AFTER_EXPERTS)
        if [ -n "${!name}" ]; then printf 'export %s=%q\n' "$name" "${!name}"; else echo "unset $name"; fi ;;
    esac
  done
  exit 0
fi

[ -d "$DDM_DATA_DIR" ] || die "DDM_DATA_DIR $DDM_DATA_DIR does not exist (run python -m data.prepare first)"
log_dir="${DDM_LOG_DIR:-$DDM_RUNS_DIR/$DDM_EXPERIMENT_NAME/slurm_logs}"

stages=()
IFS=, read -r -a requested <<< "$stages_arg"
for stage in stage2 stage3; do  # canonical order, whatever order was given
  for want in "${requested[@]}"; do [ "$want" = "$stage" ] && { stages+=("$stage"); break; }; done
done
for want in "${requested[@]}"; do
  case "$want" in stage2|stage3) ;; *) die "unknown stage '$want' in --stages (stage2, stage3)" ;; esac
done
[ "${#stages[@]}" -gt 0 ] || die "--stages is empty"
last_stage="${stages[${#stages[@]}-1]}"
router_stage="${DDM_ROUTER_STAGE:-$last_stage}"
case "$router_stage" in stage2|stage3) ;; *) die "DDM_ROUTER_STAGE must be stage2 or stage3, got '$router_stage'" ;; esac

experts="${experts_arg:-1-$K}"
[[ "$experts" =~ ^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$ ]] || die "--experts '$experts' is not an array spec like 1-3 or 1,3"
for id in ${experts//[,-]/ }; do
  [ "$id" -ge 1 ] && [ "$id" -le "$K" ] || die "expert $id in --experts is outside 1..$K"
done
array="$experts${DDM_SLURM_ARRAY_LIMIT:+%$DDM_SLURM_ARRAY_LIMIT}"

if [ "$dry_run" = 0 ]; then
  command -v sbatch >/dev/null || die "sbatch not found: run this on a SLURM login node (or use --dry-run)"
  mkdir -p "$log_dir"
fi
for stage in $(printf '%s\n' "${stages[@]}" "$router_stage" | sort -u); do
  [ -d "$DDM_DATA_DIR/shards/$stage" ] || echo "[submit] warning: no $DDM_DATA_DIR/shards/$stage yet; the $stage jobs need it when they start" >&2
done

# ------------------------------------------------------------------------------------------- sbatch flags
common_flags=()  # every job
[ -z "${DDM_SLURM_PARTITION:-}" ] || common_flags+=("--partition=$DDM_SLURM_PARTITION")
[ -z "${DDM_SLURM_ACCOUNT:-}" ] || common_flags+=("--account=$DDM_SLURM_ACCOUNT")
[ -z "${DDM_SLURM_QOS:-}" ] || common_flags+=("--qos=$DDM_SLURM_QOS")
[ -z "${DDM_SLURM_CONSTRAINT:-}" ] || common_flags+=("--constraint=$DDM_SLURM_CONSTRAINT")
[ -z "${DDM_SLURM_CPUS_PER_TASK:-}" ] || common_flags+=("--cpus-per-task=$DDM_SLURM_CPUS_PER_TASK")
case "${DDM_SLURM_MEM_GB:-}" in
  "") ;;
  0) common_flags+=("--mem=0") ;;  # SLURM: all of the node's memory
  *) common_flags+=("--mem=${DDM_SLURM_MEM_GB}G") ;;
esac
read -r -a extra_flags <<< "${DDM_SLURM_EXTRA_ARGS:-}"
common_flags+=(${extra_flags[@]+"${extra_flags[@]}"})

# resources NODES GPUS_PER_NODE TIME [TASKS_PER_NODE]: node/task/GPU/time flags into resource_flags.
# Training runs one task per GPU (Lightning's SLURM contract), so tasks default to the GPU count.
resources() {
  local gpus="$2" request="$2"
  [ -z "${DDM_SLURM_GPU_TYPE:-}" ] || request="$DDM_SLURM_GPU_TYPE:$gpus"
  resource_flags=("--nodes=$1" "--ntasks-per-node=${4:-$gpus}")
  if [ "$gpu_flag" = gres ]; then resource_flags+=("--gres=gpu:$request")
  else resource_flags+=("--gpus-per-node=$request"); fi
  [ -z "$3" ] || resource_flags+=("--time=$3")
}

# submit KEY DEPENDENCY SCRIPT FLAGS...: submit one job (or print it with --dry-run); sets job_id and
# records a row of the summary table. KEY names the job in the table and stands in for its id in a dry run.
rows=() submitted=()
submit() {
  local key="$1" dependency="$2" script="$3"; shift 3
  local cmd=(sbatch --parsable "${common_flags[@]}" "$@")
  [ -z "$dependency" ] || cmd+=("--dependency=$dependency" --kill-on-invalid-dep=yes)
  cmd+=("$repo_root/launch/slurm/$script")
  if [ "$dry_run" = 1 ]; then
    local arg line=""
    for arg in "${cmd[@]}"; do  # quote only what the shell would split or expand
      if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,{}-]+$ ]]; then line+="$arg "; else line+="$(printf '%q' "$arg") "; fi
    done
    echo "$line"
    job_id="{$key}"
  else
    local out
    if ! out="$("${cmd[@]}")"; then
      echo "[submit] error: sbatch failed for $key; the command was:" >&2
      printf '  %q' "${cmd[@]}" >&2; echo >&2
      [ "${#submitted[@]}" -eq 0 ] || echo "[submit] already submitted: ${submitted[*]} (cancel with: scancel ${submitted[*]})" >&2
      exit 1
    fi
    job_id="${out%%;*}"  # --parsable prints "id" or "id;cluster"
    job_id="${job_id//[[:space:]]/}"
    [[ "$job_id" =~ ^[0-9]+$ ]] || die "sbatch printed '$out' for $key, not a job id; already submitted: ${submitted[*]:-none}"
    submitted+=("$job_id")
  fi
  rows+=("$key|$job_id|${dependency:--}")
}

# -------------------------------------------------------------------------------------------------- DAG
name="$DDM_EXPERIMENT_NAME"
signal="--signal=USR1@${DDM_SLURM_SIGNAL_SECONDS:-300}"
echo "[submit] experiment $name: K=$K, stages ${stages[*]}, settings $cluster_env, logs $log_dir"
[ "$dry_run" = 0 ] || echo "[submit] dry run: nothing is submitted"

experts_job="" monolith_job="" router_job=""
for stage in "${stages[@]}"; do
  time_var="DDM_SLURM_TIME_${stage^^}"
  resources "${DDM_SLURM_NODES_PER_EXPERT:-1}" "$DDM_SLURM_GPUS_PER_NODE" "${!time_var:-}"
  submit "experts-$stage" "${experts_job:+aftercorr:$experts_job}" expert.sbatch \
    "${resource_flags[@]}" "$signal" "--array=$array" "--job-name=ddm-$name-experts-$stage" \
    "--output=$log_dir/expert%a-$stage-%A.out" "--export=ALL,DDM_STAGE=$stage,DDM_EXPERT="
  experts_job="$job_id"

  if [ "$with_monolith" = 1 ]; then
    mono_time_var="DDM_SLURM_TIME_MONOLITH_${stage^^}"
    resources "${DDM_SLURM_NODES_MONOLITH:-$(( K * ${DDM_SLURM_NODES_PER_EXPERT:-1} ))}" "$DDM_SLURM_GPUS_PER_NODE" \
      "${!mono_time_var:-${!time_var:-}}"
    submit "monolith-$stage" "${monolith_job:+afterok:$monolith_job}" expert.sbatch \
      "${resource_flags[@]}" "$signal" "--job-name=ddm-$name-monolith-$stage" \
      "--output=$log_dir/monolith-$stage-%j.out" "--export=ALL,DDM_STAGE=$stage,DDM_EXPERT=all"
    monolith_job="$job_id"
  fi
done

if [ "$with_router" = 1 ]; then
  router_dependency=""
  [ "$router_after_experts" = 0 ] || router_dependency="afterok:$experts_job"
  resources "${DDM_SLURM_NODES_ROUTER:-1}" "${DDM_SLURM_GPUS_ROUTER:-$DDM_SLURM_GPUS_PER_NODE}" "${DDM_SLURM_TIME_ROUTER:-}"
  submit "router-$router_stage" "$router_dependency" router.sbatch \
    "${resource_flags[@]}" "$signal" "--job-name=ddm-$name-router-$router_stage" \
    "--output=$log_dir/router-$router_stage-%j.out" "--export=ALL,DDM_STAGE=$router_stage"
  router_job="$job_id"
fi

if [ "$with_eval" = 1 ]; then
  eval_dependency="afterok:$experts_job${monolith_job:+:$monolith_job}${router_job:+:$router_job}"
  resources 1 "${DDM_SLURM_GPUS_EVAL:-1}" "${DDM_SLURM_TIME_EVAL:-}" 1  # export, evaluate: one process each
  submit evaluate "$eval_dependency" evaluate.sbatch \
    "${resource_flags[@]}" "--job-name=ddm-$name-evaluate" "--output=$log_dir/evaluate-%j.out" "--export=ALL"
fi

# ------------------------------------------------------------------------------------------------ summary
echo
printf '  %-18s %-18s %s\n' job id "depends on"
for row in "${rows[@]}"; do
  IFS='|' read -r key id dependency <<< "$row"
  printf '  %-18s %-18s %s\n' "$key" "$id" "$dependency"
done
echo
echo "[submit] experts are array tasks $experts (task id = expert id); logs in $log_dir"
if [ "$dry_run" = 0 ]; then
  echo "[submit] watch: squeue -u $USER    cancel everything: scancel ${submitted[*]}"
fi
