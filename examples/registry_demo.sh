#!/usr/bin/env bash
# The registry on two text runs: push both, promote the better one, watch a promotion refused for forgetting,
# override it with a reason, roll back, verify, and see a tampered stored file named.
#
#   examples/registry_demo.sh              # adapts two text runs first (a short one and the four-key defaults)
#   examples/registry_demo.sh RUN1 RUN2    # uses two complete text runs you already have
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
polyadapt() { "$PY" -m polyadapt "$@"; }
DEMO=runs/registry-demo
export POLYADAPT_REGISTRY=$DEMO/registry
rm -rf "$POLYADAPT_REGISTRY"
mkdir -p "$DEMO"

if [ $# -ge 2 ]; then
  first=$1 second=$2
else
  first=$DEMO/short second=$DEMO/defaults
  echo "== adapting $first (40 steps) and $second (the four-key defaults)"
  polyadapt adapt examples/text.yaml --overwrite --set output=$first --set train.max_steps=40
  polyadapt adapt examples/text.yaml --overwrite --set output=$second
fi

step() { echo; echo "\$ polyadapt registry $*"; polyadapt registry "$@" || echo "(exit code $?)"; }

step push "$first" --name harbor-support --tag stage=first --description "first try"
step push "$second" --name harbor-support --tag stage=second
step push "$second" --name harbor-support
step list harbor-support
step diff harbor-support@v1 harbor-support@v2
# which of the two is better on the held-out headline metric decides the order of promotion
better=$("$PY" - <<'EOF'
from polyadapt import registry
reg = registry.open()
a, b = reg.get("harbor-support@v1"), reg.get("harbor-support@v2")
metric = a.headline
higher = a.summary["directions"].get(metric, True)
value = lambda v: v.summary["metrics"]["after"][metric]
print(2 if (value(b) > value(a)) == higher and value(b) != value(a) else 1)
EOF
)
worse=$((3 - better))
step promote harbor-support@v$worse production
step promote harbor-support@v$better production
step promote harbor-support@v$worse production
echo; echo "== a forgetting budget of zero: any regression on the general questions refuses the promotion"
step promote harbor-support@v$better staging --max-forgetting 0
step promote harbor-support@v$better staging --max-forgetting 0 --force --reason "general-data regression reviewed"
step rollback harbor-support production
step history harbor-support
step show harbor-support@production
step verify
echo; echo "== one byte changed in a stored file"
"$PY" - <<'EOF'
from pathlib import Path
from polyadapt import registry
reg = registry.open()
digest = reg.get("harbor-support@v1").files["adapter_model.safetensors"][0]
path = Path(reg.store.key(digest))
data = bytearray(path.read_bytes()); data[-1] ^= 1; path.write_bytes(bytes(data))
EOF
step verify
step pull harbor-support@v1 --output $DEMO/pulled
