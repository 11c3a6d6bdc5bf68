"""Make an installed torchvision importable when its compiled ops cannot load.

PyPI's torchvision wheels are built against PyPI's CUDA torch. Beside the CPU build of torch that
CI installs, torchvision's ``_C`` library does not load (it links the CUDA libraries), and
torchvision 0.28 then fails at import: ``_meta_registrations`` registers fake kernels for
``torchvision::nms`` and ``torchvision::qnms`` without checking that the ops exist
("operator torchvision::nms does not exist"). Lightning (through torchmetrics), timm and
transformers import torchvision whenever it is installed.

:func:`ensure_loadable` declares those two op schemas when, and only when, the compiled library
is missing, so the pure-Python parts (``torchvision.models``) import; the detection ops stay
unavailable, which no test uses. Test code and the scripts the tests start import this module
before anything that imports torchvision. With a torchvision built for the installed torch it
does nothing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"


def _compiled_ops_load() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True  # not installed: nothing to fix
    libraries = list(Path(spec.origin).parent.glob("_C*.so"))
    try:
        for library in libraries:
            torch.ops.load_library(str(library))
    except OSError:
        return False
    return bool(libraries)


def ensure_loadable() -> None:
    """Declare ``torchvision::nms`` and ``torchvision::qnms`` if torchvision's ops cannot load."""
    if _compiled_ops_load():
        return
    for op in ("nms", "qnms"):
        if not hasattr(torch.ops.torchvision, op):
            torch.library.define(f"torchvision::{op}", SCHEMA)


ensure_loadable()
