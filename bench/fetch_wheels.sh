#!/usr/bin/env bash
# Wheels for the GPU session's peers (diffusers, Opacus) into .whl/ of this checkout, for the device
# machine, which has no package registry (/work/.library/device/README.md). All four are pure-Python
# wheels; the device image already has what else they need (huggingface-hub >= 1.32, safetensors,
# regex, requests, filelock, Pillow, scipy, opt-einsum, zipp). .whl/ is kept out of git through
# .git/info/exclude. Then: run(command="bash bench/gpu_session.sh", carry=[".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
exclude=$(git rev-parse --git-path info/exclude)
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
  diffusers==0.42.1 opacus==1.6.0 importlib_metadata==10.2.0 lazy-importer==0.1.0
ls -l .whl
du -sh .whl
