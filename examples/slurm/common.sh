# Shared by examples/slurm/*.sbatch: resolve the SLURM allocation, check the parallel degrees, build and run
# (or print) the launch command:  srun (one task per node) -> torchrun (one process per GPU) -> the trainer.
#
# Sourced, not executed. sbatch runs a *copy* of the batch script from its spool directory, so the sbatch
# scripts find this file via, in order: $USP_REPO/examples/slurm/common.sh, $SLURM_SUBMIT_DIR/examples/slurm/
# common.sh (submitted from the repo root), $SLURM_SUBMIT_DIR/common.sh (submitted from examples/slurm), and the
# script's own directory (run with plain `bash`, e.g. a dry run on a login node).
#
# Environment read here (all optional inside an allocation):
#   GPUS_PER_NODE   GPUs (= torchrun processes) per node   default: $SLURM_GPUS_ON_NODE, else $SLURM_GPUS_PER_NODE
#   NNODES          nodes                                  default: $SLURM_NNODES (or $SLURM_JOB_NUM_NODES)
#   MASTER_ADDR     rendezvous host                        default: first host of $SLURM_JOB_NODELIST
#   MASTER_PORT     rendezvous port                        default: 10000 + SLURM_JOB_ID % 50000
#   TP_SIZE PP_SIZE ULYSSES_DEGREE RING_DEGREE             tensor / pipeline / ulysses / ring degrees
#   TORCHRUN        torchrun executable (default: torchrun); SRUN_EXTRA_ARGS: extra srun options (word-split),
#                   e.g. "--container-image=... --container-mounts=..." for pyxis (srun also gets
#                   --cpus-per-task=$SLURM_CPUS_ON_NODE: a step has one CPU per task otherwise)
#   DRY_RUN=1       print the resolved srun + torchrun command and exit 0 without launching anything

USP_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export USP_REPO

usp_die() {
    echo "error: $*" >&2
    exit 1
}

usp_warn() {
    echo "warning: $*" >&2
}

usp_is_positive_int() {
    [[ "$1" =~ ^[1-9][0-9]*$ ]]
}

usp_require_positive_ints() {  # usp_require_positive_ints NAME... : each named variable holds an integer >= 1
    local name
    for name in "$@"; do
        usp_is_positive_int "${!name}" || usp_die "$name must be a positive integer, got '${!name}'"
    done
}

# --- the allocation: NNODES, GPUS_PER_NODE, WORLD_SIZE, MASTER_ADDR, MASTER_PORT --------------------------------
usp_resolve_cluster() {
    NNODES="${NNODES:-${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-}}}"
    [[ -n "$NNODES" ]] || usp_die "not inside a SLURM allocation (SLURM_NNODES is unset): submit with sbatch," \
        "or set NNODES, GPUS_PER_NODE and MASTER_ADDR for a DRY_RUN=1"
    if [[ -z "${GPUS_PER_NODE:-}" ]]; then
        # SLURM_GPUS_ON_NODE is set by --gpus-per-node / --gres; SLURM_GPUS_PER_NODE may read "h100:8"
        local per_node="${SLURM_GPUS_PER_NODE:-}"
        GPUS_PER_NODE="${SLURM_GPUS_ON_NODE:-${per_node##*:}}"
    fi
    [[ -n "$GPUS_PER_NODE" ]] || usp_die "cannot tell the number of GPUs per node (SLURM_GPUS_ON_NODE is unset):" \
        "submit with --gpus-per-node=N or set GPUS_PER_NODE"
    usp_require_positive_ints NNODES GPUS_PER_NODE
    WORLD_SIZE=$((NNODES * GPUS_PER_NODE))

    if [[ -z "${MASTER_ADDR:-}" ]]; then
        [[ -n "${SLURM_JOB_NODELIST:-}" ]] || usp_die "SLURM_JOB_NODELIST is unset: submit with sbatch or set MASTER_ADDR"
        # the first host of the allocation (read all of scontrol's output: `| head -n1` under pipefail can fail
        # with SIGPIPE when the node list is long)
        local hosts
        hosts="$(scontrol show hostnames "$SLURM_JOB_NODELIST")" || usp_die "scontrol show hostnames" \
            "'$SLURM_JOB_NODELIST' failed: is this a SLURM node? Otherwise set MASTER_ADDR"
        MASTER_ADDR="${hosts%%$'\n'*}"
        [[ -n "$MASTER_ADDR" ]] || usp_die "scontrol show hostnames '$SLURM_JOB_NODELIST' returned no host"
    fi
    # a port per job, so that two jobs sharing a node do not collide
    MASTER_PORT="${MASTER_PORT:-$((10000 + ${SLURM_JOB_ID:-0} % 50000))}"
    usp_require_positive_ints MASTER_PORT
    export MASTER_ADDR MASTER_PORT
}

# --- the degrees: TP_SIZE, PP_SIZE, ULYSSES_DEGREE, RING_DEGREE, DP_SIZE --------------------------------------------
# Defaults: ulysses over the GPUs of a node (all-to-all wants NVLink), ring across the nodes (point-to-point copes
# with the slower inter-node links), data parallel = 1.
usp_resolve_degrees() {
    TP_SIZE="${TP_SIZE:-1}"
    PP_SIZE="${PP_SIZE:-1}"
    usp_require_positive_ints TP_SIZE PP_SIZE
    if [[ -z "${ULYSSES_DEGREE:-}" ]]; then
        ((GPUS_PER_NODE % TP_SIZE == 0)) || usp_die "GPUS_PER_NODE $GPUS_PER_NODE is not divisible by TP_SIZE" \
            "$TP_SIZE: set ULYSSES_DEGREE explicitly"
        ULYSSES_DEGREE=$((GPUS_PER_NODE / TP_SIZE))
    fi
    RING_DEGREE="${RING_DEGREE:-$NNODES}"
    usp_require_positive_ints ULYSSES_DEGREE RING_DEGREE

    local model_parallel=$((TP_SIZE * PP_SIZE * ULYSSES_DEGREE * RING_DEGREE))
    local product="TP_SIZE $TP_SIZE x PP_SIZE $PP_SIZE x ULYSSES_DEGREE $ULYSSES_DEGREE x RING_DEGREE $RING_DEGREE"
    if ((WORLD_SIZE % model_parallel != 0)); then
        usp_die "GPUS_PER_NODE $GPUS_PER_NODE x NNODES $NNODES = $WORLD_SIZE GPUs is not divisible by" \
            "$product = $model_parallel: change the degrees or the number of nodes/GPUs"
    fi
    DP_SIZE=$((WORLD_SIZE / model_parallel))
    # ranks are numbered node by node, TP innermost, then ulysses: a ulysses group stays inside a node only if
    # TP x ULYSSES divides the GPUs of a node
    if ((GPUS_PER_NODE % (TP_SIZE * ULYSSES_DEGREE) != 0)); then
        usp_warn "TP_SIZE $TP_SIZE x ULYSSES_DEGREE $ULYSSES_DEGREE does not divide GPUS_PER_NODE $GPUS_PER_NODE:" \
            "ulysses all-to-all groups will span nodes (slow); prefer a smaller ULYSSES_DEGREE and a larger RING_DEGREE"
    fi
}

# --- the model: defaults shared by both launchers (a GQA model small enough for one node) ---------------------------
usp_resolve_model() {
    NUM_LAYERS="${NUM_LAYERS:-24}"
    HIDDEN_SIZE="${HIDDEN_SIZE:-2048}"
    NUM_ATTENTION_HEADS="${NUM_ATTENTION_HEADS:-32}"
    NUM_QUERY_GROUPS="${NUM_QUERY_GROUPS:-8}"
    SEQ_LENGTH="${SEQ_LENGTH:-131072}"
    MICRO_BATCH_SIZE="${MICRO_BATCH_SIZE:-1}"
    GLOBAL_BATCH_SIZE="${GLOBAL_BATCH_SIZE:-$((MICRO_BATCH_SIZE * DP_SIZE))}"
    TRAIN_ITERS="${TRAIN_ITERS:-100}"
    LR="${LR:-3e-4}"
    SEED="${SEED:-1234}"
    LOG_INTERVAL="${LOG_INTERVAL:-1}"
    BF16="${BF16:-1}"
    USP_RING_IMPL="${USP_RING_IMPL:-zigzag}"
    USP_ATTN_BACKEND="${USP_ATTN_BACKEND:-auto}"
    usp_require_positive_ints NUM_LAYERS HIDDEN_SIZE NUM_ATTENTION_HEADS NUM_QUERY_GROUPS SEQ_LENGTH \
        MICRO_BATCH_SIZE GLOBAL_BATCH_SIZE TRAIN_ITERS LOG_INTERVAL
}

# the flags both trainers share, into the array USP_COMMON_ARGS (head counts, sequence length and
# divisibility by the degrees are checked by the trainer's own validation, which names the flag to change)
usp_common_trainer_args() {
    USP_COMMON_ARGS=(
        --tensor-model-parallel-size "$TP_SIZE"
        --pipeline-model-parallel-size "$PP_SIZE"
        --num-layers "$NUM_LAYERS"
        --hidden-size "$HIDDEN_SIZE"
        --num-attention-heads "$NUM_ATTENTION_HEADS"
        --seq-length "$SEQ_LENGTH"
        --micro-batch-size "$MICRO_BATCH_SIZE"
        --global-batch-size "$GLOBAL_BATCH_SIZE"
        --train-iters "$TRAIN_ITERS"
        --lr "$LR"
        --seed "$SEED"
        --log-interval "$LOG_INTERVAL"
        --ulysses-degree "$ULYSSES_DEGREE"
        --ring-degree "$RING_DEGREE"
        --usp-ring-impl "$USP_RING_IMPL"
        --usp-attn-backend "$USP_ATTN_BACKEND"
    )
    if ((NUM_QUERY_GROUPS != NUM_ATTENTION_HEADS)); then
        USP_COMMON_ARGS+=(--group-query-attention --num-query-groups "$NUM_QUERY_GROUPS")
    fi
    if [[ "$BF16" == 1 ]]; then
        USP_COMMON_ARGS+=(--bf16)
    fi
    if [[ -n "${CHECKPOINT_DIR:-}" ]]; then
        USP_COMMON_ARGS+=(--save "$CHECKPOINT_DIR" --load "$CHECKPOINT_DIR")
    fi
    if [[ -n "${DATA_PATH:-}" ]]; then
        USP_COMMON_ARGS+=(--data-path "$DATA_PATH")
    fi
    if [[ -n "${NUM_LAYERS_PER_VIRTUAL_STAGE:-}" ]]; then  # the interleaved 1F1B schedule (both trainers' flag)
        USP_COMMON_ARGS+=(--num-layers-per-virtual-pipeline-stage "$NUM_LAYERS_PER_VIRTUAL_STAGE")
    fi
}

# --- environment for every rank (srun passes the batch environment on: --export=ALL is its default) -----------------
usp_export_env() {
    # Megatron orders its tensor-parallel communication and computation kernels on one CUDA stream queue
    export CUDA_DEVICE_MAX_CONNECTIONS=1
    # megatron_usp importable without `pip install -e .`
    export PYTHONPATH="$USP_REPO${PYTHONPATH:+:$PYTHONPATH}"
    # NCCL, cluster specific: uncomment what your cluster needs.
    # export NCCL_IB_HCA=mlx5_0,mlx5_1      # which InfiniBand adapters to use (all of them by default; pin on mixed NICs)
    # export NCCL_SOCKET_IFNAME=ib0         # interface for NCCL's bootstrap sockets (avoid docker0 / lo)
    # export GLOO_SOCKET_IFNAME=ib0         # the same for gloo (torch.distributed's CPU groups)
    # export NCCL_DEBUG=INFO                # log the chosen transports/rings; use when a job hangs at start-up
    # export NCCL_NVLS_ENABLE=0             # turn off NVLink SHARP if NVLS buffers exhaust GPU memory or fail to set up
    # export NCCL_IB_TIMEOUT=22             # longer InfiniBand retry timeout on congested fabrics
    # export TORCH_NCCL_ASYNC_ERROR_HANDLING=1  # a failed collective aborts the job instead of hanging it
    # export TORCH_NCCL_AVOID_RECORD_STREAMS=1  # free P2P (ring) buffers promptly instead of at stream sync
}

# --- print a command so that it can be pasted into a shell ----------------------------------------------------------
usp_quote_command() {
    local arg out=()
    for arg in "$@"; do
        if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
            out+=("$arg")
        else
            out+=("'${arg//\'/\'\\\'\'}'")
        fi
    done
    echo "${out[*]}"
}

# --- launch: usp_launch TRAINER_SCRIPT|-m MODULE ARG... ------------------------------------------------------------------
# One srun task per node runs torchrun; torchrun's --node-rank is $SLURM_NODEID, which srun sets per node, so it is
# expanded on each node by a small `bash -c` (torchrun is its $0, every other argument passes through untouched).
usp_launch() {
    local srun_extra=()
    # a step gets one CPU per task unless told otherwise (srun does not inherit sbatch's --cpus-per-task since
    # Slurm 22.05): give the one task per node all the node's CPUs, for torchrun's workers and their data loaders
    [[ -n "${SLURM_CPUS_ON_NODE:-}" ]] && srun_extra+=(--cpus-per-task="$SLURM_CPUS_ON_NODE")
    # shellcheck disable=SC2206  # SRUN_EXTRA_ARGS is word-split on purpose
    [[ -n "${SRUN_EXTRA_ARGS:-}" ]] && srun_extra+=(${SRUN_EXTRA_ARGS})
    local cmd=(
        srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 --cpu-bind=none
        "${srun_extra[@]}"
        bash -c 'exec "$0" --node-rank="$SLURM_NODEID" "$@"'
        "${TORCHRUN:-torchrun}"
        --nnodes="$NNODES" --nproc-per-node="$GPUS_PER_NODE"
        --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT"
        "$@"
    )
    echo "usp-slurm: job ${SLURM_JOB_ID:-none}: $NNODES nodes x $GPUS_PER_NODE GPUs = $WORLD_SIZE ranks;" \
        "TP $TP_SIZE x PP $PP_SIZE x ulysses $ULYSSES_DEGREE x ring $RING_DEGREE ($USP_RING_IMPL) x DP $DP_SIZE;" \
        "rendezvous $MASTER_ADDR:$MASTER_PORT"
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        echo "usp-slurm: DRY_RUN=1, not launching; the command (--node-rank is \$SLURM_NODEID of each node):"
        usp_quote_command "${cmd[@]}"
        exit 0
    fi
    exec "${cmd[@]}"
}
