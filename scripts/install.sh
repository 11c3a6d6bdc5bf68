#!/usr/bin/env bash
# Install curvlab (editable) with its test tools into the active Python environment.
#
# torch is handled first and on its own: an already installed torch (CPU or CUDA) is kept as it is,
# and when none is installed the pinned CPU build is installed. A bare `pip install torch` would pull
# the multi-GB CUDA build from PyPI. Every later pip call is constrained to the installed torch, so
# no extra (the `compare` libraries, Lightning) can replace it.
#
# Environment:
#   CURVLAB_EXTRAS     extras to install (default: dev), e.g. "dev,compare"
#   TORCH_VERSION      torch to install when none is present (default: 2.13.0)
#   TORCH_INDEX_URL    index for that install, e.g. https://download.pytorch.org/whl/cpu
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=${CURVLAB_EXTRAS:-dev}

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "install: no torch found; installing the CPU build torch==${TORCH_VERSION:-2.13.0}"
    "$PY" -m pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION:-2.13.0}"
fi
torch_version=$("$PY" -c "import torch; print(torch.__version__)")
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==${torch_version}" >"$constraints"
echo "install: keeping torch ${torch_version}; installing curvlab[${extras}]"

"$PY" -m pip install --quiet -c "$constraints" -e ".[${extras}]"

# torchvision comes with the dev extra (the tests build its resnet18, and timm needs it) and with
# compare (curvlinops -> backpack). PyPI's torchvision is built against PyPI's CUDA torch: beside
# a CPU torch its compiled ops do not load and its import fails ("operator torchvision::nms does
# not exist"), which breaks every package that imports it when present (torchmetrics, hence
# Lightning; timm; transformers). The test suite makes it importable (tests/torchvision_compat.py),
# so with the dev extra it is kept; otherwise (none of curvlab's own code needs it) an unloadable
# one is removed.
if [[ ",${extras}," != *",dev,"* ]] && "$PY" -m pip show torchvision >/dev/null 2>&1 \
        && ! "$PY" -c "import torchvision" >/dev/null 2>&1; then
    echo "install: removing torchvision: it does not load with torch ${torch_version}"
    "$PY" -m pip uninstall --quiet -y torchvision
fi
