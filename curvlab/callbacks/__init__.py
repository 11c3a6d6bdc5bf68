"""Training-loop integration: a :class:`Monitor` with measurements, a TensorBoard logger
(:class:`TensorBoardLogger`, needs the ``tensorboard`` extra when built), and the Lightning and
Hugging Face adapters (``curvlab.callbacks.lightning``, ``curvlab.callbacks.hf``, their extras).
A measurement of your own subclasses :class:`Measurement` and returns :class:`Record` and
:class:`Skip` entries from ``measure(ctx: Context)`` (docs/extending.md)."""

from curvlab.callbacks.measurements import (
    FeatureChange,
    FeatureSpeed,
    Loss,
    NTKSpectrum,
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
from curvlab.callbacks.spectra import HessianSpectrum, Sharpness
from curvlab.callbacks.tensorboard import TensorBoardLogger

__all__ = ["SKIP_REASONS", "Context", "FeatureChange", "FeatureSpeed", "HessianSpectrum", "Loss",
           "Measurement", "Monitor", "NTKSpectrum", "Record", "Schedule", "Sharpness", "Skip",
           "TensorBoardLogger", "eos_threshold", "resolve_blocks"]
