#!/usr/bin/env bash
# Epoch cost of this working tree against an earlier commit, measured alternately in one run:
# before, after, before, after (ROUNDS times), each a bench/cost.py sweep over small sizes where
# the loop's own overhead shows; then the medians side by side (bench/cost.py --compare).
#
#   nice -n 10 bash bench/cost_ab.sh 1d91c04 > bench/results/cost_ab.log 2>&1
#   ROUNDS=1 SIZES="--steps 1 --batches 2" bash bench/cost_ab.sh HEAD~1 /tmp/ab   # quick check
set -euo pipefail
rev=${1:?usage: bench/cost_ab.sh REV [OUT_DIR]}
out=${2:-bench/results/cost_ab}
rounds=${ROUNDS:-2}
sizes=${SIZES:---steps 1 2 4 8 --batches 2 8 16 --sweep-batch 4 --sweep-steps 4}
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$root/.venv/bin/python}
before_tree=$(mktemp -d /tmp/sdpo-before-XXXXXX)
trap 'git -C "$root" worktree remove --force "$before_tree" >/dev/null 2>&1 || rm -rf "$before_tree"' EXIT
git -C "$root" worktree add --detach --force "$before_tree" "$rev" >/dev/null
mkdir -p "$out"
before=() after=()
for i in $(seq 1 "$rounds"); do
  echo "round $i: before ($rev)"
  # the old tree's own sdpo_core first on the path (the venv's editable install points here)
  (cd "$before_tree" && PYTHONPATH="$before_tree" "$py" bench/cost.py $sizes --profile-size none \
     --out "$root/$out/before_$i.json") | tail -n 2
  before+=("$out/before_$i.json")
  echo "round $i: after (working tree)"
  (cd "$root" && "$py" bench/cost.py $sizes --profile-size none --out "$out/after_$i.json") | tail -n 2
  after+=("$out/after_$i.json")
done
(IFS=,; "$py" "$root/bench/cost.py" --compare "${before[*]}" "${after[*]}") | tee "$out/compare.md"
