#!/usr/bin/env bash
# Runs sweep configs one after another (resumable: finished runs are skipped).
#   LQJAX_DATA_DIR=... bash scripts/run_queue.sh sweeps/a.json sweeps/b.json ...
set -u
cd "$(dirname "$0")/.."
for cfg in "$@"; do
  echo "=== $cfg $(date -u +%H:%M:%S)"
  python scripts/sweep.py --config "$cfg"
done
echo "=== done $(date -u +%H:%M:%S)"
