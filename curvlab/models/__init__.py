"""Parametrizations (SP, NTP, muP, Depth-muP, interpolated) and reference models."""

from curvlab.models.depth import effective_depth, transfer_lr
from curvlab.models.nets import MLP, ResidualBlock, ResNet
from curvlab.models.parametrizations import (
    NTP,
    SP,
    DepthMuP,
    Interpolated,
    MuP,
    Parametrization,
    ScaledLinear,
    interpolated,
)

__all__ = ["MLP", "NTP", "SP", "DepthMuP", "Interpolated", "MuP", "Parametrization", "ResNet",
           "ResidualBlock", "ScaledLinear", "effective_depth", "interpolated", "transfer_lr"]
