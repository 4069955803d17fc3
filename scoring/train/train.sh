#!/usr/bin/env bash
# Retrains the demo models from scratch: builds feedgraph, loads the demo graph into a
# scratch data directory, exports the broker's scorer features for sampled users, and
# runs train.py in a venv with the pinned requirements. Writes scoring/models/,
# scoring/tests/reference/ and scoring/train/metrics.json (all committed).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
work="${FEEDGRAPH_TRAIN_DIR:-/var/tmp/feedgraph-train}"
mkdir -p "$work"
venv="$work/venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# Idempotent: pip only fetches what the venv lacks.
"$venv/bin/pip" install --quiet --disable-pip-version-check -r scoring/train/requirements.txt
./dev feedgraph export-features --demo --data-dir "$work/data" --users 800 --rows-per-feed 60 \
  --out "$work/features.csv"
"$venv/bin/python" scoring/train/train.py --features "$work/features.csv" --out scoring/models \
  --reference scoring/tests/reference --metrics scoring/train/metrics.json
