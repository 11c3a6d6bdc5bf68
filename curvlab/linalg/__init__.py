"""Spectral estimators as pure functions of an operator (anything with shape, dtype, device, @).

A dense ``torch.Tensor`` qualifies, so every estimator is tested on designed matrices; vectors are
flat ``(P,)`` and blocks ``(P, m)``. Nothing here knows about models.
"""

from curvlab.linalg.lanczos import lanczos
from curvlab.linalg.power import power_iteration
from curvlab.linalg.results import ConvergenceError, EigResult, SpectralDensity, TraceResult
from curvlab.linalg.slq import spectral_density
from curvlab.linalg.trace import hutchinson_trace, hutchpp_trace
from curvlab.linalg.tracking import subspace_eigs

__all__ = [
    "ConvergenceError",
    "EigResult",
    "SpectralDensity",
    "TraceResult",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos",
    "power_iteration",
    "spectral_density",
    "subspace_eigs",
]
