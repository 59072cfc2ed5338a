#!/usr/bin/env bash
# The project's test command: set up .venv, start a local Slurm for the Slurm tests (when this
# machine can), and run every CPU test (GPU tests are marked `gpu` / `multigpu` and run on the H200).
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${NVFP4_SKIP_SLURM:-0}" != "1" ]; then
  # Installs Debian's slurm-wlm if missing (needs root), starts slurmctld + slurmd on localhost
  # with AuthType=auth/none and prints `export SLURM_CONF=...`. Without a running Slurm the
  # Slurm tests skip, unless NVFP4_REQUIRE_SLURM=1 (CI sets it) makes them fail.
  if eval "$(bash scripts/slurm_local.sh start)"; then
    trap 'bash scripts/slurm_local.sh stop >/dev/null 2>&1 || true' EXIT
  elif [ "${NVFP4_REQUIRE_SLURM:-0}" = "1" ]; then
    echo "error: a local Slurm could not be started (see [slurm_local] lines above)" >&2; exit 1
  fi
fi
export PYTHONUNBUFFERED=1
.venv/bin/python -m pytest -m "not gpu and not multigpu" "$@"
