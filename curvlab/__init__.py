"""curvlab: curvature and feature-learning diagnostics for PyTorch.

See ``../shared/DESIGN.md`` for the public API and ``../shared/MATH.md`` for the definitions.
"""

from curvlab import func, testing
from curvlab.operators import GGNOperator, HessianOperator, OperatorBase
from curvlab.preconditioning import Preconditioned, adam_scales, lr_scales, preconditioned

__version__ = "0.1.0"

__all__ = [
    "GGNOperator",
    "HessianOperator",
    "OperatorBase",
    "Preconditioned",
    "__version__",
    "adam_scales",
    "func",
    "lr_scales",
    "preconditioned",
    "testing",
]
