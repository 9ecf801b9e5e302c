"""gradfilter: cheap fine-tuning of CNNs through gradient filtering (Yang et al., CVPR 2023)."""

from .allocator import tune_cpu_allocator
from .blocks import fuse_blocks
from .functional import UnsupportedDilationError, conv1d, conv2d
from .linear import fuse_linear
from .memory import count_saved
from .nn import FilteredConv1d, FilteredConv2d
from .optim import FlushBeforeStep, flush_before_step
from .runtime import export_training  # lazy: imports ExecuTorch only when called
from .surgery import (
    ConversionReport,
    LayerReport,
    apply,
    conv_layers,
    freeze,
    remove,
    slim,
)

__version__ = "0.2.0"

__all__ = [
    "ConversionReport",
    "FilteredConv1d",
    "FilteredConv2d",
    "FlushBeforeStep",
    "LayerReport",
    "UnsupportedDilationError",
    "apply",
    "conv1d",
    "conv2d",
    "conv_layers",
    "flush_before_step",
    "count_saved",
    "export_training",
    "freeze",
    "fuse_blocks",
    "fuse_linear",
    "remove",
    "slim",
    "tune_cpu_allocator",
]
