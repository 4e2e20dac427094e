#!/usr/bin/env bash
# Run HERE (with network to PyPI) before a GPU session: downloads into .whl/ the wheels that the GPU machine's Python 3.12
# lacks (it already has torch, torchaudio, transformers, peft, accelerate, pluggy, safetensors, tensorboard...).
# gpu_check.sh installs them from .whl/ without touching the network. Carry `.whl` with the device call.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64)
fetch() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$@"
}
version() { python3 - "$1" <<'PY'
import sys
for line in open("constraints.txt"):
    name, _, v = line.strip().partition("==")
    if name.lower().replace("_", "-") == sys.argv[1]:
        print(v)
PY
}
for pkg in pydantic pydantic-core annotated-types typing-inspection diffusers jiwer rapidfuzz soundfile gguf \
           librosa soxr audioread lazy-loader pooch; do
  v=$(version "$pkg")
  fetch "${pkg}${v:+==$v}"
done
ls -la .whl
