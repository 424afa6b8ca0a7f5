#!/usr/bin/env bash
# ResNet-20/CIFAR-10 on the long schedule (sweeps/long_cifar10_resnet20.json: FP32, LSQ
# 2-bit and the 2-bit budget, 100 epochs, one seed each, three at once) on a bare GPU
# machine that a call reaches with at most 64 MiB. Prepared here, in the checkout:
#
#   python scripts/dataset_parts.py split $LQJAX_DATA_DIR/cifar10 .parts/cifar10 --max_mib 48
#
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl zstandard==0.25.0
#
# (.parts/ and .whl/ are git-ignored; zstandard writes the entropy-coded file and is the
# one package of lqjax's that the GPU image lacks). Then, on the device machine, one
# call per part, each carrying .parts/cifar10/manifest.json and its part, in quick
# succession so that the machine stays warm (a 48 MiB part and the 11 MB working tree
# fit a 64 MiB call): `stash` with train.npz's part00, part01 and part02, then `run`
# with test.npz's part00 and .whl:
#
#   bash scripts/gpu_frontier_cifar.sh stash       # keeps the parts in .device_data/
#   bash scripts/gpu_frontier_cifar.sh run         # the last group: joins, checks, trains
#
# `run` joins the parts into .device_data/cifar10/ (every part's and file's sha256
# checked against the manifest made here; a mismatch stops it with one line), trains
# the sweep with --jobs 3 in resumable workdirs under .device_data/runs/ (a second `run`
# on a still-warm machine resumes them), and leaves the sweep's record as
# $OUT/long_cifar10_resnet20.tar.gz (results.jsonl and each run's metrics.jsonl): unpack
# it under results/ here and commit it.
set -euo pipefail
cd "$(dirname "$0")/.."
keep=.device_data
mode=${1:-}
case "$mode" in stash|run) ;; *) echo "usage: gpu_frontier_cifar.sh stash|run" >&2; exit 2;; esac
. scripts/gpu_env.sh
mkdir -p "$keep/parts"
if [ -d .parts/cifar10 ]; then cp .parts/cifar10/* "$keep/parts/"; fi
if [ "$mode" = stash ]; then
  python3 scripts/dataset_parts.py join "$keep/parts" --check || true
  exit 0
fi
python3 scripts/dataset_parts.py join "$keep/parts" "$keep/cifar10"
export LQJAX_DATA_DIR=$keep XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 PYTHONUNBUFFERED=1
set +e
python3 scripts/sweep.py --config sweeps/long_cifar10_resnet20.json --runs_dir "$keep/runs" \
  --results_dir "$keep/results" --jobs 3
rc=$?
set -e
out=${OUT:-$keep/out}
mkdir -p "$out"
tar -czf "$out/long_cifar10_resnet20.tar.gz" -C "$keep/results" long_cifar10_resnet20
tail -n 5 "$keep"/runs/long_cifar10_resnet20/*/log.txt || true
exit $rc
