#!/usr/bin/env bash
# Epoch cost of this working tree against an earlier commit, measured alternately in one run:
# before, after, before, after (ROUNDS times), each a bench/cost.py sweep over small sizes where
# the loop's own overhead shows; then the medians side by side (bench/cost.py --compare).
#
#   nice -n 10 bash bench/cost_ab.sh 1d91c04 > bench/results/cost_ab.log 2>&1
#   bash bench/cost_ab.sh --smoke OUT_DIR    # HEAD against the working tree, one tiny size (CI)
set -euo pipefail
if [[ ${1:-} == --smoke ]]; then
  rev=HEAD out=${2:?usage: bench/cost_ab.sh --smoke OUT_DIR} rounds=1
  sizes="--steps 1 --batches 2 --sweep-batch 2 --sweep-steps 1 --train-batch 2 --repeats 1"
else
  rev=${1:?usage: bench/cost_ab.sh REV [OUT_DIR]}
  out=${2:-bench/results/cost_ab}
  rounds=${ROUNDS:-2}
  sizes=${SIZES:---steps 1 2 4 8 --batches 2 8 16 --sweep-batch 4 --sweep-steps 4}
fi
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$root/.venv/bin/python}
before_tree=$(mktemp -d /tmp/sdpo-before-XXXXXX)
trap 'git -C "$root" worktree remove --force "$before_tree" >/dev/null 2>&1 || rm -rf "$before_tree"' EXIT
git -C "$root" worktree add --detach --force "$before_tree" "$rev" >/dev/null
mkdir -p "$out"
abs_out=$(cd "$out" && pwd)
before=() after=()
for i in $(seq 1 "$rounds"); do
  echo "round $i: before ($rev)"
  # the old tree's own sdpo_core first on the path (the venv's editable install points here)
  (cd "$before_tree" && PYTHONPATH="$before_tree" "$py" bench/cost.py $sizes --profile-size none \
     --out "$abs_out/before_$i.json") | tail -n 2
  before+=("$abs_out/before_$i.json")
  echo "round $i: after (working tree)"
  (cd "$root" && "$py" bench/cost.py $sizes --profile-size none --out "$abs_out/after_$i.json") | tail -n 2
  after+=("$abs_out/after_$i.json")
done
(IFS=,; "$py" "$root/bench/cost.py" --compare "${before[*]}" "${after[*]}") | tee "$out/compare.md"
