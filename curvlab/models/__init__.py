"""Parametrizations (SP, NTP, muP, Depth-muP, interpolated) and reference models."""

from curvlab.models.depth import effective_depth, transfer_lr
from curvlab.models.nets import MLP, ConvNet, ResidualBlock, ResNet, Transformer, TransformerBlock
from curvlab.models.parametrizations import (
    NTP,
    SP,
    DepthMuP,
    Interpolated,
    MuP,
    Parametrization,
    ScaledConv2d,
    ScaledLinear,
    interpolated,
)

__all__ = [
    "MLP",
    "NTP",
    "SP",
    "ConvNet",
    "DepthMuP",
    "Interpolated",
    "MuP",
    "Parametrization",
    "ResNet",
    "ResidualBlock",
    "ScaledConv2d",
    "ScaledLinear",
    "Transformer",
    "TransformerBlock",
    "effective_depth",
    "interpolated",
    "transfer_lr",
]
