#!/usr/bin/env bash
# One prepared GPU check of nemo-dmc (issue 15) for a bare single-GPU Hopper machine.
#
#   bash bench/gpu_check.sh                 # on the GPU machine (about 5-8 minutes)
#   bash bench/gpu_check.sh --dry-run       # on a CPU machine: every step at tiny sizes
#   bash bench/gpu_check.sh --list [--dry-run]   # print the steps' commands, run nothing
#   bash bench/gpu_check.sh --fetch-wheels  # where pip reaches PyPI: fill .whl/ (see below)
#
# Steps, each with its own timeout, all inside one overall budget; a failed step does not
# stop the next ones:
#   setup             install the carried wheels (.whl/*.whl) into a private --target folder,
#                     make nemo_dmc.kernels resolve to kernels/, print versions and the GPU
#                     (bench/gpu_check_env.py)
#   gpu_tests         pytest -m gpu over the test files that hold gpu-marked tests
#   kernels_decode    bench/kernels_decode.py --gpu-sizes (Triton paged decode and the fused
#                     cache update; CR 4 vs the same kernel at CR 1 vs torch SDPA, dense)
#   decode            bench/decode.py at 8k context x batch 8 and 16, a 4-layer 7B-width bf16
#                     model: CR 4 vs DMC off (paged, same engine) vs megatron's static cache
#   kernels_training  bench/kernels_training.py (fused partial accumulation + DMC attention
#                     fwd/bwd vs torch SDPA)
#   train_step        bench/train_step.py --gpu-sizes (DMC vs vanilla fwd+bwd, bf16)
#
# Output: one folder, $OUT when set (the device tool's), else runs/gpu_check/<time>-<mode>/:
# summary.md (step table: status, exit code, seconds, command; then each log's last lines,
# also printed at the end) and one <n>_<step>.log per step: 7 files in all.
# Exit status: the number of steps that did not pass (0: all passed).
#
# Environment: PYTHON (default python3), OUT, GPU_CHECK_BUDGET_S (overall seconds for the
# steps, default 540: the device tool allows 600 s per command), GPU_CHECK_WHEELS (default
# <repo>/.whl), GPU_CHECK_SITE (where wheels install, default /tmp/gpu_check_site),
# GPU_CHECK_DRY_RUN=1 (same as --dry-run), GPU_CHECK_STEPS (names of the steps to run, e.g.
# "setup decode"; default all; setup is needed first on a fresh machine).
#
# Wheels: the device image has Python 3.12, torch 2.11 (CUDA 13), triton 3.6, transformers 5,
# numpy 2 and pytest, but no megatron-core, hydra or omegaconf; those travel in .whl/ (about
# 2.6 MB, see --fetch-wheels for the exact pip commands). numpy stays the image's (its compiled
# packages need 2.x); setup aliases np.product, which megatron-core 0.15 calls. Transformer
# Engine and NeMo are not carried (too large / too many pins), so their gpu tests skip.
# torch and triton are the image's.
set -u -o pipefail

WHEEL_PINS=(megatron-core==0.15.3 hydra-core==1.3.2 omegaconf==2.3.0)
SDIST_PINS=(antlr4-python3-runtime==4.9.3)  # omegaconf/hydra's parser; published as sdist only
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64
           manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)
# Test files holding gpu-marked tests (tests/test_gpu_check_script.py keeps this list whole).
GPU_TEST_FILES=(tests/test_convert_layout.py tests/test_kernels_accumulation.py
                tests/test_kernels_cache_update.py tests/test_kernels_decode_attention.py
                tests/test_kernels_dmc_attention.py tests/test_megatron_dmc.py
                tests/test_nemo.py tests/test_training_loop.py)

MODE=gpu LIST=0 FETCH=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) MODE=dry ;;
    --list) LIST=1 ;;
    --fetch-wheels) FETCH=1 ;;
    -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done
[ "${GPU_CHECK_DRY_RUN:-0}" = 1 ] && MODE=dry

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
PY=${PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-$REPO/.whl}
SITE=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
BUDGET=${GPU_CHECK_BUDGET_S:-540}

if [ "$FETCH" = 1 ]; then
  # Wheels for the device's Python 3.12 on x86-64, fetched where PyPI is reachable.
  mkdir -p "$WHEELS"
  plat=(); for p in "${PLATFORMS[@]}"; do plat+=(--platform "$p"); done
  set -x
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${plat[@]}" -d "$WHEELS" "${WHEEL_PINS[@]}" || exit 1
  "$PY" -m pip wheel --no-deps -w "$WHEELS" "${SDIST_PINS[@]}" || exit 1
  set +x
  ls -l "$WHEELS"; du -ch "$WHEELS"/*.whl | tail -1
  exit 0
fi

# --- the steps: name, timeout (s), command on the GPU, command of the dry run ---------------
NAMES=() TIMEOUTS=() GPU_CMDS=() DRY_CMDS=()
step() { NAMES+=("$1"); TIMEOUTS+=("$2"); GPU_CMDS+=("$3"); DRY_CMDS+=("$4"); }

step setup 120 \
  "setup_env && \$PY bench/gpu_check_env.py --require-cuda && nvidia-smi" \
  "setup_env && \$PY bench/gpu_check_env.py"
step gpu_tests 240 \
  "PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 \$PY -m pytest -m gpu -p no:cacheprovider -q -rfEs --durations=15 ${GPU_TEST_FILES[*]}" \
  "PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 \$PY -m pytest -m gpu -p no:cacheprovider -q -rfEs ${GPU_TEST_FILES[*]}"
step kernels_decode 120 \
  "\$PY bench/kernels_decode.py --gpu-sizes --steps 30" \
  "\$PY bench/gpu_check_args.py bench/kernels_decode.py --gpu-sizes --steps 30 && \$PY bench/kernels_decode.py --context 256 --batch 2 --steps 2"
step decode 200 \
  "\$PY bench/decode.py --device cuda --shape gpu --contexts 8192 --batches 8 16 --ratios 4 --steps 10 --threads 8" \
  "\$PY bench/gpu_check_args.py bench/decode.py --device cuda --shape gpu --contexts 8192 --batches 8 16 --ratios 4 --steps 10 --threads 8 && \$PY bench/decode.py --device cpu --contexts 128 --batches 2 --ratios 4 --steps 1 --threads 1"
step kernels_training 120 \
  "\$PY bench/kernels_training.py --kv-heads 8 --steps 10" \
  "\$PY bench/gpu_check_args.py bench/kernels_training.py --kv-heads 8 --steps 10 && \$PY bench/kernels_training.py --seq 64 --heads 2 --kv-heads 1 --dim 16 --steps 1 --threads 1"
step train_step 180 \
  "\$PY bench/train_step.py --device cuda --gpu-sizes --steps 10" \
  "\$PY bench/gpu_check_args.py bench/train_step.py --device cuda --gpu-sizes --steps 10 && \$PY bench/train_step.py --device cpu --seq 32 --batch 1 --steps 1"

if [ "$LIST" = 1 ]; then
  for i in "${!NAMES[@]}"; do
    if [ "$MODE" = dry ]; then cmd=${DRY_CMDS[$i]}; else cmd=${GPU_CMDS[$i]}; fi
    printf '%s\t%s\t%s\n' "${NAMES[$i]}" "${TIMEOUTS[$i]}" "$cmd"
  done
  exit 0
fi

# --- environment --------------------------------------------------------------------------
OUT=${OUT:-$REPO/runs/gpu_check/$(date -u +%Y%m%dT%H%M%SZ)-$MODE}
mkdir -p "$OUT" || exit 2
export PYTHONUNBUFFERED=1
if [ "$MODE" = dry ]; then
  export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

setup_env() {  # run inside the setup step; exports reach later steps through ENV_FILE
  if [ "$MODE" = gpu ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "+ installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE"
    ls -l "$WHEELS"/*.whl
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$WHEELS"/*.whl || return 1
    echo "export PYTHONPATH=$SITE:$REPO\${PYTHONPATH:+:\$PYTHONPATH}" >>"$ENV_FILE"
    . "$ENV_FILE"
    # The image's numpy 2 stays (its compiled packages need it); megatron-core 0.15's
    # dist_checkpointing calls np.product, removed in numpy 2: alias it at start-up.
    if ! "$PY" -c 'import numpy; numpy.product' 2>/dev/null; then
      echo "+ numpy $("$PY" -c 'import numpy; print(numpy.__version__)') lacks np.product: aliased to np.prod (sitecustomize)"
      printf '%s\n' 'try:' '    import numpy' \
        '    if not hasattr(numpy, "product"):' '        numpy.product = numpy.prod' \
        'except Exception:' '    pass' >"$SITE/sitecustomize.py"
    fi
  elif [ "$MODE" = gpu ]; then
    echo "+ no wheels in $WHEELS: using the installed packages"
  fi
  # nemo_dmc.kernels is kernels/ (setup.py's package_dir); a plain checkout on PYTHONPATH
  # needs the link nemo_dmc/kernels -> ../kernels (made only when the import misses it).
  . "$ENV_FILE"
  local where
  where=$("$PY" -c 'import os, nemo_dmc.kernels as k; print(os.path.realpath(k.__path__[0]))' \
          2>/dev/null)
  if [ "$where" != "$(realpath "$REPO/kernels")" ]; then
    if [ -e nemo_dmc/kernels ] || [ -L nemo_dmc/kernels ]; then
      echo "nemo_dmc.kernels resolves to '${where}', and nemo_dmc/kernels exists"; return 1
    fi
    echo "+ ln -s ../kernels nemo_dmc/kernels (nemo_dmc.kernels resolved to '${where}')"
    ln -s ../kernels nemo_dmc/kernels || return 1
  fi
}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
ENV_FILE=$WORK/env.sh
echo "export PYTHONPATH=$REPO\${PYTHONPATH:+:\$PYTHONPATH}" >"$ENV_FILE"
export -f setup_env
export MODE WHEELS SITE REPO PY ENV_FILE

# --- run ----------------------------------------------------------------------------------
START=$SECONDS
STATUS=() RCS=() SECS=()
FAILED=0
for i in "${!NAMES[@]}"; do
  name=${NAMES[$i]}
  if [ "$MODE" = dry ]; then cmd=${DRY_CMDS[$i]}; else cmd=${GPU_CMDS[$i]}; fi
  log=$OUT/$((i + 1))_$name.log
  if [ -n "${GPU_CHECK_STEPS:-}" ] && [[ " ${GPU_CHECK_STEPS//,/ } " != *" $name "* ]]; then
    STATUS+=("not selected") RCS+=("-") SECS+=(0)
    echo "# $name: not selected (GPU_CHECK_STEPS=$GPU_CHECK_STEPS)" >"$log"
    continue
  fi
  left=$((BUDGET - (SECONDS - START)))
  limit=${TIMEOUTS[$i]}
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 15 ]; then
    STATUS+=("SKIPPED (budget spent)") RCS+=("-") SECS+=(0)
    FAILED=$((FAILED + 1))
    echo "== $name: skipped, the ${BUDGET}s budget is spent" | tee "$log"
    continue
  fi
  echo "== $name (limit ${limit}s): $cmd"
  t0=$SECONDS
  {
    echo "# $name, $(date -u +%FT%TZ), limit ${limit}s, mode $MODE"
    echo "# $cmd"
    timeout -k 10 "$limit" bash -c ". \"\$ENV_FILE\"; $cmd"
  } >"$log" 2>&1
  rc=$?
  dt=$((SECONDS - t0))
  case $rc in
    0) st=ok ;;
    124|137) st="TIMEOUT (${limit}s)"; FAILED=$((FAILED + 1)) ;;
    *) st="FAILED"; FAILED=$((FAILED + 1)) ;;
  esac
  STATUS+=("$st") RCS+=("$rc") SECS+=("$dt")
  echo "   $st, exit $rc, ${dt}s, log $log"
done

# --- summary ------------------------------------------------------------------------------
SUMMARY=$OUT/summary.md
{
  echo "# nemo-dmc GPU check ($MODE mode), $(date -u +%FT%TZ)"
  echo
  echo "host $(uname -n), $(uname -m); git $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '-');" \
       "device: $( (nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo none) | head -1)"
  echo "total $((SECONDS - START))s of a ${BUDGET}s budget; $FAILED of ${#NAMES[@]} steps did not pass"
  echo
  echo "| step | status | exit | seconds | command |"
  echo "|---|---|---|---|---|"
  for i in "${!NAMES[@]}"; do
    if [ "$MODE" = dry ]; then cmd=${DRY_CMDS[$i]}; else cmd=${GPU_CMDS[$i]}; fi
    echo "| ${NAMES[$i]} | ${STATUS[$i]} | ${RCS[$i]} | ${SECS[$i]} | \`${cmd//|/\\|}\` |"
  done
  for i in "${!NAMES[@]}"; do
    log=$OUT/$((i + 1))_${NAMES[$i]}.log
    echo
    echo "## ${NAMES[$i]}: ${STATUS[$i]} (last lines of $(basename "$log"))"
    echo '```'
    grep -v -E 'Warning|warnings.warn|^ +import pynvml|^  (return|warn)' "$log" | tail -n 18
    echo '```'
  done
} >"$SUMMARY"
rm -rf "$WORK"
echo
cat "$SUMMARY"
echo
echo "summary and logs in $OUT"
exit $((FAILED > 100 ? 100 : FAILED))
