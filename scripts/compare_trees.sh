#!/usr/bin/env bash
# Runs the same short training commands in two checkouts of lqjax and says whether their
# results (accuracies, losses, bits per layer, accounted bytes, every epoch's metrics) are
# identical: the check that a refactor of the training path changed no number.
#
#   git worktree add /tmp/old <commit>; git worktree add /tmp/new HEAD
#   LQJAX_DATA_DIR=../shared/datasets bash scripts/compare_trees.sh /tmp/old /tmp/new
#
# Each tree is run from its own folder (python -m experiments.X), with this checkout's
# Python unless PYTHON is set.
set -u
old=${1:?usage: compare_trees.sh OLD_TREE NEW_TREE}; new=${2:?usage: compare_trees.sh OLD_TREE NEW_TREE}
py=${PYTHON:-$(command -v python)}
out=$(mktemp -d)
export JAX_PLATFORMS=cpu
CMDS=(
 "experiments.mnist --model=lenet5 --rule=lsq --bits=4 --granularity=channel --epochs=1 --limit=6000"
 "experiments.mnist --epochs=3 --limit=6000 --threshold=0.3"
 "experiments.mnist --rule=lsq --inverse_scale=0.1 --deviation=1 --bin_count=0.1 --target_bits=2 --epochs=1 --limit=6000"
 "experiments.cifar10 --rule=ratio_lsq --granularity=channel --epochs=1 --limit=2000 --batch_size=100"
)
status=0
for i in "${!CMDS[@]}"; do
  for side in old new; do
    dir=$old; [ $side = new ] && dir=$new
    (cd "$dir" && "$py" -m ${CMDS[$i]} --noprogress --noexport --workdir="$out/$side$i" \
      > "$out/$side$i.log" 2>&1) || { echo "failed: $side: ${CMDS[$i]} (log $out/$side$i.log)"; status=1; }
  done
  "$py" - "$out" "$i" "${CMDS[$i]}" <<'PY' || status=1
import json, sys
out, i, cmd = sys.argv[1:]
load = lambda side: json.load(open(f"{out}/{side}{i}/results.json"))
rows = lambda side: [{k: r[k] for k in ("val_accuracy", "val_loss", "train_loss", "avg_bits",
                                         "scale_mult", "bits_per_layer")}
                     for r in map(json.loads, open(f"{out}/{side}{i}/metrics.jsonl"))]
o, n = load("old"), load("new")
keys = ("test_accuracy", "val_accuracy", "test_loss", "avg_bits", "packed_bytes_accounted",
        "quantized_bits_per_layer")
same = all(o[k] == n[k] for k in keys) and rows("old") == rows("new")
print(f"{cmd}: test {n['test_accuracy']:.4f} bits {n['avg_bits']:.4f} accounted "
      f"{n['packed_bytes_accounted']} | identical: {same}")
sys.exit(0 if same else 1)
PY
done
exit $status
