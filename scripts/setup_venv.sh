#!/usr/bin/env bash
# Idempotent install of the project's environment into .venv.
#
# Detectron2 is not on PyPI and its source host is unreachable from this workplace, so it is
# installed from the `sal-detectron2` wheel (upstream detectron2 main of 2024-04-17, repackaged)
# using only its pure-Python code: ROIAlign/NMS come from torchvision, and the cp310 `_C` binary
# is removed because it cannot load under Python 3.11. Costs ~1.5 min and ~5.8 GB (CUDA torch
# build, which is what pip finds for torch 2.14.1 + torchvision 0.29.1 here; it runs on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
STAMP="$VENV/.nucseg-setup-complete"
REQ_HASH=$(cat scripts/setup_venv.sh requirements.txt setup.py 2>/dev/null | sha256sum | cut -c1-16)
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$REQ_HASH" ]]; then
  exit 0
fi
PYTHON=${PYTHON:-python3}
# pip on this machine lists every local wheel folder it skips; keep the log to what matters.
exec 2> >(grep -v "^WARNING: Location '" >&2)
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade 'pip<26'
"$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
"$PY" -m pip install -q -r requirements.txt
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if ! "$PY" -c 'import detectron2' 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --only-binary=:all: --python-version 3.10 --target "$SITE" \
    sal-detectron2==0.7.2
fi
rm -f "$SITE"/detectron2/_C.cpython-310-x86_64-linux-gnu.so
"$PY" -m pip install -q --no-deps --no-build-isolation -e .
echo "$REQ_HASH" > "$STAMP"
