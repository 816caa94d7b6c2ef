#!/usr/bin/env bash
# Runs a long benchmark from a frozen copy of one commit, so that editing the checkout cannot break it.
#
#   benchmarks/frozen.sh COMMIT CORE COMMAND...
#
# COMMIT is archived (`git archive`) into /tmp/frozen/COMMIT and installed there (adapters/ and cli/
# map into nd_plugin, so the tree itself is not importable; the copy keeps only the install of it).
# COMMAND runs in that copy with one thread, pinned to CPU core CORE, ND_GIT_COMMIT naming the commit
# in every JSON it writes.
# Relative paths in COMMAND are relative to the copy: give data, weights and outputs as absolute paths.
#
# Example (one 12-epoch record row on core 1, the other core free for a second job):
#   nohup benchmarks/frozen.sh de9ee82 1 python benchmarks/compare_pruners.py --epochs 12 --threads 1 ... \
#       --out-dir /tmp/rec12/runs --json /tmp/rec12/compare_12ep.json --reuse > /tmp/rec12/run.log 2>&1 &
set -euo pipefail
if (( $# < 3 )); then
  sed -n 2,14p "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
commit=$(git -C "$(dirname "$0")/.." rev-parse --short "$1")
core=$2
shift 2
copy=/tmp/frozen/$commit
if [ ! -d "$copy/_site/nd_plugin" ]; then
  rm -rf "$copy" && mkdir -p "$copy"
  git -C "$(dirname "$0")/.." archive "$commit" | tar x -C "$copy"
  python -m pip install -q --no-deps --no-build-isolation --target "$copy/_site" "$copy" > "$copy/pip.log" 2>&1 \
    || { tail -5 "$copy/pip.log" >&2; exit 1; }
  # only the installed package may be imported: not the tree's half of it (no adapters/, cli/ inside),
  # nor, through it, the checkout's editable install
  rm -rf "$copy/nd_plugin" "$copy/adapters" "$copy/cli" "$copy/build" "$copy"/*.egg-info
fi
cd "$copy"
export PYTHONPATH=$copy/_site ND_GIT_COMMIT=$commit OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1
exec taskset -c "$core" "$@"
