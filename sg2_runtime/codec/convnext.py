"""Causal ConvNeXt stacks (the encoder's feature extractor and the decoder's refiner), 100 Hz.

Stem: causal conv (kernel 7) + LayerNorm; each later stage starts with LayerNorm + 1x1 conv
to the stage width; every block is depthwise causal conv -> LayerNorm -> 4x MLP with GELU ->
per-channel layer scale, added to its input; a final LayerNorm closes the stack. Drop-path is a
training-only identity and does not appear here.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import CausalConv, Norm, ReleasedLayer, WNLinear
from .state import StepContext


class ConvNeXtBlock(ReleasedLayer):
    """Causal depthwise conv -> LayerNorm -> MLP (x4, GELU) -> layer scale, plus the residual."""

    def __init__(self, ref: str, dim: int, kernel_size: int):
        super().__init__()
        self.ref = ref
        self.dwconv = CausalConv(
            ref + ".dwconv.conv", dim, dim, kernel_size, groups=dim, pad_ref=ref + ".dwconv.pad_buffer"
        )
        self.norm = Norm(ref + ".norm", dim, 1e-6)
        self.pwconv1 = WNLinear(ref + ".pwconv1", dim, 4 * dim, bias=True)
        self.pwconv2 = WNLinear(ref + ".pwconv2", 4 * dim, dim, bias=True)
        self.register_buffer("gamma", torch.ones(dim))

    def released_shapes(self) -> dict[str, tuple[int, ...]]:
        return {self.ref + ".gamma": tuple(self.gamma.shape)}

    def load_released(self, sd: Mapping[str, Tensor]) -> None:
        self.gamma.copy_(sd[self.ref + ".gamma"])

    def export_released(self) -> dict[str, Tensor]:
        return {self.ref + ".gamma": self.gamma.float().clone()}

    def _mlp(self, h: Tensor, x: Tensor) -> Tensor:
        h = self.pwconv2(F.gelu(self.pwconv1(self.norm(h))))
        return x + self.gamma * h

    def forward(self, x: Tensor) -> Tensor:
        return self._mlp(self.dwconv(x), x)

    def step(self, x: Tensor, ctx: StepContext) -> Tensor:
        return self._mlp(self.dwconv.step(x, ctx), x)


class ConvNeXt(nn.Module):
    """Stem conv + LayerNorm, then per stage: [LayerNorm + 1x1 conv] + ConvNeXt blocks, final norm."""

    def __init__(
        self, ref: str, input_channels: int, depths: tuple[int, ...], dims: tuple[int, ...], kernel: int
    ):
        super().__init__()
        self.stem = CausalConv(
            f"{ref}.downsample_layers.0.0.conv",
            input_channels,
            dims[0],
            kernel,
            pad_ref=f"{ref}.downsample_layers.0.0.pad_buffer",
        )
        self.stem_norm = Norm(f"{ref}.downsample_layers.0.1", dims[0], 1e-6)
        self.mid_norms = nn.ModuleList()
        self.mid_convs = nn.ModuleList()
        for i in range(1, len(dims)):
            self.mid_norms.append(Norm(f"{ref}.downsample_layers.{i}.0", dims[i - 1], 1e-6))
            self.mid_convs.append(
                CausalConv(
                    f"{ref}.downsample_layers.{i}.1.conv",
                    dims[i - 1],
                    dims[i],
                    1,
                    pad_ref=f"{ref}.downsample_layers.{i}.1.pad_buffer",
                )
            )
        self.stages = nn.ModuleList(
            nn.ModuleList(ConvNeXtBlock(f"{ref}.stages.{i}.{j}", dims[i], kernel) for j in range(depth))
            for i, depth in enumerate(depths)
        )
        self.norm = Norm(f"{ref}.norm", dims[-1], 1e-6)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem_norm(self.stem(x))
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = self.mid_convs[i - 1](self.mid_norms[i - 1](x))
            for block in stage:
                x = block(x)
        return self.norm(x)

    def step(self, x: Tensor, ctx: StepContext) -> Tensor:
        x = self.stem_norm(self.stem.step(x, ctx))
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = self.mid_convs[i - 1](self.mid_norms[i - 1](x))
            for block in stage:
                x = block.step(x, ctx)
        return self.norm(x)
