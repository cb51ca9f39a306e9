#!/usr/bin/env bash
# Creates .venv/ in the repository with everything sglang-ext needs. Idempotent:
# a second run only re-installs the project itself.
#
# On a machine without an NVIDIA GPU it also installs SGLang 0.5.23 the CPU way
# (torch CPU wheel first, sglang --no-deps, then its import-time dependencies),
# plus the torchvision workaround. On a GPU machine the user's own SGLang is used.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip install --disable-pip-version-check -q"

have_gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then have_gpu=1; fi

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  # torch==2.13.0 resolves to the CPU wheel on CPU machines; any looser spec pulls CUDA packages.
  echo "[install] torch==2.13.0"
  $PIP torch==2.13.0
fi

echo "[install] core dependencies"
$PIP triton numpy scipy matplotlib tqdm nvidia-ml-py pytest pytest-timeout "pyzmq>=25.1.2" requests aiohttp

if [ "$have_gpu" = 0 ] || [ "${SGLANG_EXT_INSTALL_SGLANG:-0}" = 1 ]; then
  if ! "$VENV/bin/python" -c "import importlib.metadata as m; assert m.version('sglang')=='0.5.23'" >/dev/null 2>&1; then
    echo "[install] sglang 0.5.23 (CPU recipe: --no-deps, then its import-time dependencies)"
    $PIP --no-deps sglang==0.5.23
  fi
  $PIP numpy orjson psutil pybase64 requests packaging pillow fastapi msgspec "pyzmq>=25.1.2" triton tqdm \
    IPython aiohttp setproctitle apache-tvm-ffi==0.1.11 transformers==5.19.0 dill sentencepiece==0.2.1 \
    compressed-tensors==0.18.0 gguf openai==2.8.0 partial_json_parser einops "uvicorn>=0.51" \
    uvloop jsonschema xgrammar==0.2.7 soundfile==0.13.1 python-multipart "prometheus-client>=0.20.0"
  # torchvision from PyPI is a CUDA build; with CPU torch its import fails on the
  # missing torchvision::nms operator. Installed without deps so torch stays the CPU one.
  $PIP --no-deps torchvision==0.28.0
  # Pre-seed an empty torchvision._meta_registrations in every interpreter
  # (a .pth file, because SGLang spawns its processes) so that torchvision imports.
  site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  cat > "$site/sglang_ext_torchvision_cpu.pth" <<'PTH'
import sys, types; sys.modules.setdefault('torchvision._meta_registrations', types.ModuleType('torchvision._meta_registrations'))
PTH
fi

echo "[install] sglang-ext (editable)"
$PIP --no-deps --no-build-isolation -e .
echo "[install] done: $VENV"
