#!/usr/bin/env bash
# The project's test command: set up .venv, start a local Slurm for the Slurm tests (when this
# machine can), and run every CPU test (GPU tests are marked `gpu` / `multigpu` and run on the H200).
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -f scripts/slurm_local.sh ] && [ "${NVFP4_SKIP_SLURM:-0}" != "1" ]; then
  # Starts slurmctld + slurmd on localhost and exports nothing: tests find Slurm through `sinfo`.
  bash scripts/slurm_local.sh start
fi
export PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest -m "not gpu and not multigpu" "$@"
