"""curvlab: curvature and feature-learning diagnostics for PyTorch.

The README gives the tour of the public API; each module's docstring states its definitions and
sources, and ``curvlab.batches`` the convention for batches and model outputs.
"""

import importlib.metadata

from curvlab import (
    batches,
    callbacks,
    distributed,
    func,
    layers,
    linalg,
    losses,
    models,
    testing,
)
from curvlab.analysis import SuperConsistency, super_consistency, sweep_report
from curvlab.batches import count_tokens
from curvlab.callbacks import (
    SKIP_REASONS,
    FeatureChange,
    FeatureSpeed,
    HessianSpectrum,
    Loss,
    Monitor,
    NTKSpectrum,
    Sharpness,
    TensorBoardLogger,
)
from curvlab.curvature import BatchFunctions, CurvatureOperator, OperatorBase
from curvlab.features import (
    FeatureChangeResult,
    FeatureSpeedResult,
    feature_change,
    feature_speed,
)
from curvlab.hdf5 import RunLogger
from curvlab.kernel_metrics import (
    effective_rank,
    kernel_alignment,
    kernel_distance,
    relative_change,
)
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
    subspace_eigs,
)
from curvlab.loggers import MetricLogger
from curvlab.models import NTP, SP, DepthMuP, MuP, effective_depth, interpolated, transfer_lr
from curvlab.ntk import NTKOperator, empirical_ntk, empirical_ntk_per_layer, ntk_eigenvalues
from curvlab.operators import GGNOperator, HessianOperator
from curvlab.plotting import plot_lr_sweep, plot_metrics, plot_overlay
from curvlab.preconditioning import Preconditioned, adam_scales, lr_scales, preconditioned
from curvlab.runs import Metric, Run, load_run, load_runs
from curvlab.scaling import Exponent, fit_exponent
from curvlab.sharpness import sharpness
from curvlab.update_budget import MaximalUpdateLR, maximal_update_lr

__version__ = importlib.metadata.version("curvlab")  # pyproject.toml, via the metadata

__all__ = [
    "NTP",
    "SKIP_REASONS",
    "SP",
    "BatchFunctions",
    "ConvergenceError",
    "CurvatureOperator",
    "DepthMuP",
    "EigResult",
    "Exponent",
    "FeatureChange",
    "FeatureChangeResult",
    "FeatureSpeed",
    "FeatureSpeedResult",
    "GGNOperator",
    "HessianOperator",
    "HessianSpectrum",
    "Loss",
    "MaximalUpdateLR",
    "Metric",
    "MetricLogger",
    "Monitor",
    "MuP",
    "NTKOperator",
    "NTKSpectrum",
    "OperatorBase",
    "Preconditioned",
    "Run",
    "RunLogger",
    "Sharpness",
    "SpectralDensity",
    "SuperConsistency",
    "TensorBoardLogger",
    "TraceResult",
    "__version__",
    "adam_scales",
    "batches",
    "callbacks",
    "count_tokens",
    "distributed",
    "effective_depth",
    "effective_rank",
    "empirical_ntk",
    "empirical_ntk_per_layer",
    "feature_change",
    "feature_speed",
    "fit_exponent",
    "func",
    "hutchinson_trace",
    "hutchpp_trace",
    "interpolated",
    "kernel_alignment",
    "kernel_distance",
    "lanczos",
    "layers",
    "linalg",
    "load_run",
    "load_runs",
    "losses",
    "lr_scales",
    "maximal_update_lr",
    "models",
    "ntk_eigenvalues",
    "plot_lr_sweep",
    "plot_metrics",
    "plot_overlay",
    "power_iteration",
    "preconditioned",
    "relative_change",
    "sharpness",
    "spectral_density",
    "subspace_eigs",
    "super_consistency",
    "sweep_report",
    "testing",
    "transfer_lr",
]
