#!/usr/bin/env bash
# The one prepared check for a machine with a CUDA GPU whose python3 already has torch/transformers/peft/accelerate.
# Missing packages travel as wheels in .whl/ (benchmarks/fetch_gpu_wheels.sh); nothing is fetched from the network.
# Runs the gpu-marked tests and every benchmark on CUDA; prints one table; writes logs and JSON under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -m pip install -q --no-index --no-deps --no-build-isolation -e core -e plugins/text -e plugins/speech -e plugins/image \
  >"$OUT/install.log" 2>&1 || { echo "install failed"; tail -20 "$OUT/install.log"; exit 1; }
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('device:', torch.cuda.get_device_name(0))" || exit 1

status=0
$PY -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" || status=1
for script in benchmarks/*_throughput.py; do
  name=$(basename "$script" .py)
  $PY "$script" --device cuda --json "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log" || status=1
done
$PY - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print("\n== summary (CUDA) ==")
print(f"{'benchmark':<22} {'measure':<44} {'value':>12}")
for path in sorted(out.glob("*_throughput.json")):
    for key, value in json.loads(path.read_text()).items():
        if isinstance(value, (int, float)):
            print(f"{path.stem:<22} {key:<44} {value:>12.4g}")
tests = (out / "gpu_tests.log").read_text().strip().splitlines()
print("gpu tests:", tests[-1] if tests else "no output")
PY
exit $status
