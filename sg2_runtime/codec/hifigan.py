"""Causal HiFi-GAN generator (100 Hz features -> 24 kHz waveform) with grouped residual blocks.

Stage i: LeakyReLU(0.1) -> causal transposed conv (x scale_i, channels halve) -> grouped block.
The grouped block copies its input `groups` times along channels and runs dilated grouped convs
over the copies (each group its own kernel, so one grouped conv = `groups` parallel residual
branches), then a 1x1 conv folds the copies back. The output conv runs in float32, after a
LeakyReLU with the default 0.01 slope (as in the reference), followed by tanh.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import HiFiGANConfig
from .layers import CausalConv, CausalConvTranspose
from .state import StepContext

REF = "decoder_hifigan"


class GroupedResBlock(nn.Module):
    def __init__(self, ref: str, channels: int, cfg: HiFiGANConfig):
        super().__init__()
        self.groups = cfg.groups
        self.slope = cfg.negative_slope
        wide = channels * cfg.groups
        k = cfg.resblock_kernel_sizes[0]

        def conv(name: str, dilation: int) -> CausalConv:
            return CausalConv(
                f"{ref}.{name}.conv",
                wide,
                wide,
                k,
                dilation=dilation,
                groups=cfg.groups,
                bias=cfg.bias,
                pad_ref=f"{ref}.{name}.pad_buffer",
            )

        dilations = cfg.resblock_dilations[0]
        self.convs1 = nn.ModuleList(conv(f"convs1.{j}", d) for j, d in enumerate(dilations))
        self.convs2 = nn.ModuleList(conv(f"convs2.{j}", 1) for j in range(len(dilations)))
        if not cfg.use_additional_convs:
            self.convs2 = nn.ModuleList()
        self.conv_out = CausalConv(f"{ref}.conv_out", wide, channels, 1, bias=False)

    def _run(self, x: Tensor, ctx: StepContext | None) -> Tensor:
        # The grouped convs run channels-first (B, groups * C, T); in and out are channels-last.
        x = x.transpose(1, 2).repeat(1, self.groups, 1)
        for j, conv1 in enumerate(self.convs1):
            h = F.leaky_relu(x, self.slope)
            h = conv1(h) if ctx is None else conv1.step(h, ctx)
            if len(self.convs2):
                h = F.leaky_relu(h, self.slope)
                h = self.convs2[j](h) if ctx is None else self.convs2[j].step(h, ctx)
            x = h + x
        return self.conv_out(x.transpose(1, 2))

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x, None)

    def step(self, x: Tensor, ctx: StepContext) -> Tensor:
        return self._run(x, ctx)


class HiFiGAN(nn.Module):
    def __init__(self, cfg: HiFiGANConfig):
        super().__init__()
        self.slope = cfg.negative_slope
        ch = cfg.channels
        self.input_conv = CausalConv(
            f"{REF}.input_conv.conv",
            cfg.in_channels,
            ch,
            cfg.kernel_size,
            pad_ref=f"{REF}.input_conv.pad_buffer",
        )
        self.upsamples = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for i, scale in enumerate(cfg.upsample_scales):
            cin, cout = ch // (2**i), ch // (2 ** (i + 1))
            self.upsamples.append(CausalConvTranspose(f"{REF}.upsamples.{i}", cin, cout, scale, bias=True))
            self.blocks.append(GroupedResBlock(f"{REF}.blocks.{i}", cout, cfg))
        self.output_conv = CausalConv(
            f"{REF}.output_conv.conv",
            ch // (2 ** len(cfg.upsample_scales)),
            1,
            cfg.kernel_size,
            pad_ref=f"{REF}.output_conv.pad_buffer",
        )
        self.output_conv.keep_float32 = True
        for lin in self.output_conv.lins:
            lin.keep_float32 = True

    def _run(self, c: Tensor, ctx: StepContext | None) -> Tensor:
        c = self.input_conv(c) if ctx is None else self.input_conv.step(c, ctx)
        for up, block in zip(self.upsamples, self.blocks, strict=True):
            c = F.leaky_relu(c, self.slope)
            c = up(c) if ctx is None else up.step(c, ctx)
            c = block(c) if ctx is None else block.step(c, ctx)
        c = F.leaky_relu(c, 0.01).float()
        c = self.output_conv(c) if ctx is None else self.output_conv.step(c, ctx)
        return torch.tanh(c)

    def forward(self, c: Tensor) -> Tensor:
        """(B, T, C) features -> (B, T * upsample, 1) float32 waveform."""
        return self._run(c, None)

    def step(self, c: Tensor, ctx: StepContext) -> Tensor:
        return self._run(c, ctx)
