# Shell helpers shared by the SLURM job scripts (expert.sbatch, router.sbatch, evaluate.sbatch).
# Sourced, never executed. Holds no cluster specifics: everything arrives in DDM_* environment variables
# that launch/submit.sh exports from the cluster-settings file (see launch/cluster.env.example).

ddm_log() {
  echo "[ddm $(date '+%Y-%m-%d %H:%M:%S')] $*"
}

ddm_die() {
  echo "[ddm] error: $*" >&2
  exit 1
}

# ddm_require VAR...: fail naming every required variable that is unset or empty.
ddm_require() {
  local missing=() name
  for name in "$@"; do
    [ -n "${!name:-}" ] || missing+=("$name")
  done
  [ "${#missing[@]}" -eq 0 ] || ddm_die "missing settings: ${missing[*]} (launch/submit.sh sets them from the cluster-settings file)"
}

# ddm_override KEY VALUE: append one Hydra override to the DDM_OVERRIDES array. VALUE stays plain when
# it is a simple word (paths, names) and is single-quoted otherwise, so a space or a comma can neither
# split it into two tokens nor turn it into a Hydra sweep.
DDM_OVERRIDES=()
ddm_override() {
  local key="$1" value="$2"
  if [[ "$value" =~ ^[A-Za-z0-9_./:@+-]+$ ]]; then
    DDM_OVERRIDES+=("$key=$value")
  elif [[ "$value" == *"'"* || "$value" == *'\'* ]]; then
    ddm_die "cannot pass $key a value containing a quote or a backslash: $value"
  else
    DDM_OVERRIDES+=("$key='$value'")
  fi
}

# ddm_extra_overrides TEXT: append the user's extra overrides (space-separated key=value tokens).
ddm_extra_overrides() {
  local extra=()
  read -r -a extra <<< "${1:-}"
  DDM_OVERRIDES+=(${extra[@]+"${extra[@]}"})  # the guard keeps bash < 4.4 quiet on an empty list
}

# ddm_activate_env: run the cluster's software setup (module loads, venv activation) on the compute node.
ddm_activate_env() {
  if [ -n "${DDM_ENV_SETUP:-}" ]; then
    ddm_log "environment setup: $DDM_ENV_SETUP"
    eval "$DDM_ENV_SETUP"
  elif [ -f "$DDM_REPO/.venv/bin/activate" ]; then
    ddm_log "environment setup: source $DDM_REPO/.venv/bin/activate"
    # shellcheck disable=SC1091
    source "$DDM_REPO/.venv/bin/activate"
  fi
  DDM_PYTHON="${DDM_PYTHON:-python}"
  command -v "$DDM_PYTHON" >/dev/null || ddm_die "python command '$DDM_PYTHON' not found after the environment setup (DDM_ENV_SETUP / DDM_PYTHON)"
}

# ddm_world_size: set DDM_NODES and DDM_TASKS_PER_NODE from the allocation (one task per GPU, as
# Lightning expects: trainer.devices = tasks per node).
ddm_world_size() {
  DDM_NODES="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
  DDM_TASKS_PER_NODE="${SLURM_NTASKS_PER_NODE:-}"
  DDM_TASKS_PER_NODE="${DDM_TASKS_PER_NODE%%(*}"  # SLURM may write "4(x2)" for a uniform layout
  if [ -z "$DDM_TASKS_PER_NODE" ]; then
    DDM_TASKS_PER_NODE=$(( ${SLURM_NTASKS:-$DDM_NODES} / DDM_NODES ))
  fi
}

# ddm_training_overrides: the overrides every training job shares (experiment, K, data/run/weights roots,
# world size), appended to DDM_OVERRIDES.
ddm_training_overrides() {
  ddm_world_size
  [ -z "${DDM_EXPERIMENT:-}" ] || ddm_override experiment "$DDM_EXPERIMENT"
  ddm_override experiment_name "$DDM_EXPERIMENT_NAME"
  ddm_override num_experts "$DDM_NUM_EXPERTS"
  ddm_override paths.runs_dir "$DDM_RUNS_DIR"
  ddm_override paths.data_dir "$DDM_DATA_DIR"
  [ -z "${DDM_WEIGHTS_DIR:-}" ] || ddm_override paths.weights_dir "$DDM_WEIGHTS_DIR"
  ddm_override trainer.num_nodes "$DDM_NODES"
  ddm_override trainer.devices "$DDM_TASKS_PER_NODE"
}

# ddm_banner WHAT: one block in the log saying what runs where (helps when reading requeued logs).
ddm_banner() {
  ddm_log "=== $1"
  ddm_log "job ${SLURM_JOB_ID:-none} array ${SLURM_ARRAY_JOB_ID:-none}_${SLURM_ARRAY_TASK_ID:-none} restart ${SLURM_RESTART_COUNT:-0}"
  ddm_world_size
  ddm_log "nodes ${SLURM_JOB_NODELIST:-$(hostname)} ($DDM_NODES); tasks per node $DDM_TASKS_PER_NODE"
}

# ddm_srun CMD...: launch CMD once per task; a rank that dies takes the others down instead of hanging them.
ddm_srun() {
  ddm_log "srun $*"
  srun --kill-on-bad-exit=1 "$@"
}

# Settings every job needs.
ddm_require DDM_REPO DDM_EXPERIMENT_NAME DDM_NUM_EXPERTS DDM_RUNS_DIR DDM_DATA_DIR
cd "$DDM_REPO"
