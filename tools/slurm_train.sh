#!/bin/bash
# Train on several machines under SLURM, one torchrun per machine, and come back after a preemption or the time
# limit where the job stopped (docs/distributed.md, "SLURM"):
#
#     sbatch tools/slurm_train.sh --cfg configs/coco_r101.yaml --output /shared/output/coco_r101 [KEY=VALUE ...]
#
# Edit the #SBATCH lines for your cluster (nodes, GPUs, time). The output folder must be on storage every node
# sees. What happens on a signal:
# - preemption: SLURM sends SIGTERM to every process of the job (this script, srun, torchrun, the workers). Each
#   worker finishes its step, all agree to stop after the same one, rank 0 writes model_<iteration>.pth, and the
#   workers exit 143 (128 + SIGTERM); torchrun exits 1. With --requeue SLURM puts the job back in the queue itself.
# - time limit: --signal sends USR1 to this script 180 s before it; the script sends SIGTERM to the training (as
#   above), waits for it, and requeues the job with `scontrol requeue`.
# Every run of the job passes --resume, so a requeued job continues from the newest checkpoint (a first run, with
# no checkpoint yet, starts from the beginning). --max-restarts=3 restarts all workers when one fails (a crashed
# process or machine): they resume from the newest checkpoint by themselves. A training that ends on an error
# exits with torchrun's status and is not requeued.
#
#SBATCH --job-name=detectron_res
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@180
#SBATCH --open-mode=append

set -u
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# restarted workers need a fresh rendezvous store: torchrun's shared one keeps the dead workers' addresses
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

time_limit=0
on_usr1() {
    echo "slurm_train.sh: time limit near: stopping the training at a checkpoint, then requeueing job $SLURM_JOB_ID"
    time_limit=1
    kill -TERM "$training" 2>/dev/null
}
trap on_usr1 USR1
trap 'kill -TERM "$training" 2>/dev/null' TERM  # preemption: pass it on (SLURM requeues by itself)

srun torchrun --nnodes="$SLURM_NNODES" --nproc_per_node="${SLURM_GPUS_ON_NODE:-8}" --max-restarts=3 \
    --rdzv-backend=c10d --rdzv-endpoint="$head:29500" --rdzv-id="$SLURM_JOB_ID" \
    tools/train_det.py --resume "$@" &
training=$!
status=0
while kill -0 "$training" 2>/dev/null; do
    wait "$training"  # returns early (status > 128) when a trapped signal arrives; then wait again
    status=$?
done
if [ "$time_limit" = 1 ]; then
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$status"
