"""Block-level gradient filtering: a whole inverted-residual block's backward at patch resolution.

Inside a block of filtered convolutions (MobileNetV2 / EfficientNet-Lite ``InvertedResidual``:
1×1 conv, BatchNorm, ReLU6, depthwise conv, BatchNorm, ReLU6, 1×1 conv, BatchNorm, skip), the
gradient leaving a filtered conv is constant on each r×r patch (docs/spec.md §4.4). The eval-mode
BatchNorm and ReLU/ReLU6 between the convs are per-pixel masks and per-channel affines, and the
next conv only needs the patch *means* of what they produce. With ``g`` one value per patch:

* ReLU/ReLU6 then BatchNorm then the conv's patch mean: ``mean_P(g · m · s) = g · s · |m|_P / |P|``
  (``m`` the activation's pass mask, ``|m|_P`` its count in the patch, ``s = γ/σ``);
* BatchNorm's weight gradient ``Σ g · m · x̂ = Σ_P g_P · (Σ_P m·z − μ |m|_P) / σ`` (``z`` its
  input), its bias gradient ``Σ_P g_P · |m|_P``; the conv's bias gradient likewise.

So the forward keeps, per unit (conv → BatchNorm → activation), three patch-resolution maps: the
mask count, the masked sum of ``z`` and the sum of the activation output (the next conv's x̃);
the backward never touches a full-resolution map except to pool the gradient arriving at the
block and to write the one it passes down. The results are the per-layer filtered convolutions'
with exact BatchNorm and ReLU gradients whenever the gradient arriving at the block is constant
on its patches — as it is between such blocks and from a global-average-pooling head. Otherwise
the block works with that gradient's patch means from its last unit on: where the last unit has
no activation (an inverted residual) only its BatchNorm's weight gradient differs (as with
``slim(bn="patch")``); where it has one (``Conv2dNormActivation``) its mask meets the patch means
instead of the pixels, so all the block's gradients differ. The skip passes the gradient on exactly.

Supported blocks: torchvision ``InvertedResidual`` and ``Conv2dNormActivation``, timm
``InvertedResidual`` (no squeeze-excite, no drop-path), whose convs are all filtered with one
radius, dilation 1, odd kernels, dense or depthwise, size-preserving padding, stride 1 except
at most one stride-2 conv whose 2r×2r input patches are unions of 2×2 patches of the grid before
it (checked per input size; elsewhere the block runs its per-layer path). A timm EfficientNet's
``conv_head`` fuses with the ``bn2`` (BatchNorm + activation) after it: the model's
``forward_features`` runs them as one unit (:class:`FusedHeadMixin`).

A fused block right before the model's global average pooling (that EfficientNet head,
torchvision MobileNetV2's ``features.18``: :class:`FusedPoolMixin`) also pools inside the fused
node: the mean is the sum of the last unit's patch sums over H·W, and its gradient g/(H·W) is
already one value per patch, so neither the map's pooling nor the spread-out gradient's
re-pooling runs (exact, like the rest).

On the CPU with the native kernels each direction is one C++ call per block
(``native.fused_block_forward`` / ``fused_block_backward``) under one C++ autograd node
(``native.fused_block``); elsewhere (GPU, ``GRADFILTER_NATIVE=0``) the same steps run as a
Python autograd Function looping over the units with PyTorch ops, the reference path. The native
forward hands each block's output patch sums to the next fused block whose input is that very
tensor, unchanged (same TensorImpl and version), which then does not sum its input map again
(``native.fused_hand_offs`` counts them).
"""

from .modules import FusedBlockMixin, FusedHeadMixin, FusedPoolMixin
from .transform import enclosing_blocks, fuse_blocks
from .units import fusable

__all__ = ["FusedBlockMixin", "FusedHeadMixin", "FusedPoolMixin", "enclosing_blocks", "fusable",
           "fuse_blocks"]
