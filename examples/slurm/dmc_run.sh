# The body of the DMC sbatch scripts (examples/slurm/dmc_*.sbatch), sourced after their
# #SBATCH header has set RECIPE and RUN_NAME: checks the inputs, sets up the torch.distributed
# rendezvous and runs every task of the allocation under srun.

: "${BASE_CKPT:?set BASE_CKPT to the base model checkpoint (NeMo 2 directory with weights/)}"
: "${TOKENIZER:?set TOKENIZER to the tokenizer of the model (HF directory or tokenizer.json)}"
: "${TRAIN_PREFIX:?set TRAIN_PREFIX to the training .bin/.idx prefix}"
: "${VALID_PREFIX:?set VALID_PREFIX to the validation .bin/.idx prefix}"
RUN_DIR=${RUN_DIR:-$REPO/runs/$RUN_NAME}
PYTHON=${PYTHON:-python}

# torch.distributed rendezvous: the first node of the allocation, a port from the job id.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export CUDA_DEVICE_MAX_CONNECTIONS=1   # megatron: ordered TP/SP communication kernels

cd "$REPO"
srun --kill-on-bad-exit=1 "$PYTHON" -m nemo_dmc.train \
  +recipe="$RECIPE" \
  hydra.run.dir="$RUN_DIR" \
  checkpoint.pretrained="$BASE_CKPT" \
  data.tokenizer="$TOKENIZER" \
  "data.train_prefixes=[$TRAIN_PREFIX]" \
  "data.valid_prefixes=[$VALID_PREFIX]" \
  "$@"
