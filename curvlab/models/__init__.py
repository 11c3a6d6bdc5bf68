"""Parametrizations (SP, NTP, muP, Depth-muP, interpolated) and reference models."""

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
           "ResidualBlock", "ScaledLinear", "interpolated"]
