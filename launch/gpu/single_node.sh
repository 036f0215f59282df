#!/usr/bin/env bash
# One training process on one machine, using all its GPUs (JAX sees them as local devices).
#
#   CONFIG=configs/mae.py:base,steps=1000 WORKDIR=runs/mae launch/gpu/single_node.sh
#
# Arguments are passed to `python -m cacophony_jax.main`; rerunning with the same WORKDIR
# resumes from its newest checkpoint. CUDA_VISIBLE_DEVICES picks a subset of GPUs.
#
# Settings (environment):
#   CONFIG, WORKDIR  required
#   VENV             virtual environment to activate (default: <repo>/.venv)
#   DRY_RUN=1        print the command instead of running it (1/true/yes/on, any
#                    case; 0/false/no/off or unset runs)

set -euo pipefail

: "${CONFIG:?set CONFIG, e.g. CONFIG=configs/mae.py:base}"
: "${WORKDIR:?set WORKDIR, the folder for checkpoints and metrics}"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"

# Inside a SLURM allocation of several tasks (salloc -n 8, or an sbatch script), the
# entry point would take the SLURM variables for a multi-process run and stop, asking
# for one srun task per process; drop them (and explicit coordinator settings) so this
# process runs alone with every GPU of the node.
CMD=(env -u SLURM_JOB_ID -u SLURM_STEP_NODELIST -u SLURM_NTASKS -u SLURM_PROCID
     -u SLURM_LOCALID -u COORDINATOR_ADDRESS -u JAX_COORDINATOR_ADDRESS -u NUM_PROCESSES
     -u PROCESS_ID -u JAX_LOCAL_DEVICE_IDS
     python -m cacophony_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" "$@")

DRY_VALUE=$(printf '%s' "${DRY_RUN:-0}" | tr '[:upper:]' '[:lower:]')
case "$DRY_VALUE" in  # the values the TPU launcher accepts
  1|true|yes|on) DRY=1 ;;
  0|false|no|off|"") DRY=0 ;;
  *) echo "single_node.sh: DRY_RUN must be 1/true/yes/on or 0/false/no/off, got '$DRY_RUN'" >&2; exit 2 ;;
esac
if [[ $DRY == 1 ]]; then
  printf '%q ' "${CMD[@]}"
  echo
  exit 0
fi

VENV=${VENV:-$REPO/.venv}
if [[ ! -f "$VENV/bin/activate" ]]; then
  echo "single_node.sh: no virtual environment at $VENV; create it (see README.md) or set VENV" >&2
  exit 2
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
exec "${CMD[@]}"
