"""curvlab: curvature and feature-learning diagnostics for PyTorch.

See ``../shared/DESIGN.md`` for the public API and ``../shared/MATH.md`` for the definitions.
"""

from curvlab import func, linalg, testing
from curvlab.linalg import (
    ConvergenceError,
    EigResult,
    SpectralDensity,
    TraceResult,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    power_iteration,
    spectral_density,
)
from curvlab.operators import GGNOperator, HessianOperator, OperatorBase
from curvlab.preconditioning import Preconditioned, adam_scales, lr_scales, preconditioned
from curvlab.sharpness import sharpness

__version__ = "0.1.0"

__all__ = [
    "ConvergenceError",
    "EigResult",
    "GGNOperator",
    "HessianOperator",
    "OperatorBase",
    "Preconditioned",
    "SpectralDensity",
    "TraceResult",
    "__version__",
    "adam_scales",
    "func",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos",
    "linalg",
    "lr_scales",
    "power_iteration",
    "preconditioned",
    "sharpness",
    "spectral_density",
    "testing",
]
