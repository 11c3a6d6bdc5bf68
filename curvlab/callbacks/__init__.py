"""Training-loop integration: a :class:`Monitor` with measurements, and a Lightning adapter
(``curvlab.callbacks.lightning``, needs the ``lightning`` extra)."""

from curvlab.callbacks.measurements import (
    FeatureChange,
    FeatureSpeed,
    HessianSpectrum,
    Loss,
    NTKSpectrum,
    Sharpness,
    eos_threshold,
    resolve_blocks,
)
from curvlab.callbacks.monitor import (
    SKIP_REASONS,
    Context,
    Measurement,
    Monitor,
    Record,
    Schedule,
    Skip,
)

__all__ = ["SKIP_REASONS", "Context", "FeatureChange", "FeatureSpeed", "HessianSpectrum", "Loss",
           "Measurement", "Monitor", "NTKSpectrum", "Record", "Schedule", "Sharpness", "Skip",
           "eos_threshold", "resolve_blocks"]
