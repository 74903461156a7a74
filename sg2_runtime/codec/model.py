"""The codec network: encoder (audio -> tokens) and decoder (tokens -> audio), both causal.

`CodecModel` only holds weights. The whole-utterance paths (`encode`, `decode`) and the
streaming paths (`encode_step`, `decode_step`, which take an explicit
:class:`~.state.StepContext`) run the same layers in the same order:

    encode: log-mel (100 Hz) -> ConvNeXt -> transformer -> resampler /2 -> resampler /2 (25 Hz)
            -> residual VQ (3 tokens per frame)
    decode: codeword sum -> 1x1 projector -> transformer (25 Hz) -> 1x1 projector
            -> transposed conv x2 -> x2 (100 Hz) -> transformer -> ConvNeXt -> HiFi-GAN (x240)

Activations are channels-last (batch, time, channels); debugging intermediates are returned in
the reference's (batch, channels, time) layout so they compare directly with its tensors.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .config import CodecConfig
from .convnext import ConvNeXt
from .hifigan import HiFiGAN
from .kernels import Linear
from .layers import CausalConv, CausalConvTranspose, ReleasedLayer
from .mel import MelFrontend
from .quantizer import ResidualVQ
from .state import StateSpec, StepContext
from .transformer import Transformer

Intermediates = dict[str, Tensor]


def _record(store: Intermediates | None, name: str, x: Tensor) -> None:
    if store is not None:
        store[name] = x.detach().float().transpose(1, 2).contiguous()


class CodecModel(nn.Module):
    def __init__(self, config: CodecConfig):
        super().__init__()
        self.config = config
        self.compute_dtype = torch.float32  # set by to_runtime
        c = config
        fast = c.downsample_stride  # transformer steps per token frame at 100 Hz
        self.mel = MelFrontend(c.mel_kwargs)
        ec = c.encoder_convnext_kwargs
        self.encoder_convnext = ConvNeXt(
            "encoder_convnext", ec.input_channels, ec.depths, ec.dims, ec.kernel_size
        )
        self.encoder_transformer = Transformer("encoder_transformer", c.encoder_transformer_kwargs, fast)
        ds = c.encoder_extra_down_sample_kwargs
        self.down_sample_1, self.down_sample_2 = (
            CausalConv(
                f"encoder_extra_down_sample_{i}.conv.conv.conv",
                ds.dimension,
                ds.dimension,
                2 * ds.stride,
                stride=ds.stride,
                bias=False,
                pad_mode="replicate",
            )
            for i in (1, 2)
        )
        self.quantizer = ResidualVQ(c.quantizer_kwargs)
        pp, ppv = c.post_projecter_kwargs, c.post_projecter_of_vq_transformer_kwargs
        self.post_projector = CausalConv(
            "post_projector.project.conv",
            pp.input_channels,
            pp.output_channels,
            1,
            bias=pp.bias,
            pad_ref="post_projector.project.pad_buffer",
        )
        self.vq_transformer = Transformer("vq_transformer", c.vq_transformer_kwargs, 1)
        self.post_projector_of_vq_transformer = CausalConv(
            "post_projector_of_vq_transformer.project.conv",
            ppv.input_channels,
            ppv.output_channels,
            1,
            bias=ppv.bias,
            pad_ref="post_projector_of_vq_transformer.project.pad_buffer",
        )
        up = c.decoder_extra_up_sample_kwargs
        self.up_sample_1, self.up_sample_2 = (
            CausalConvTranspose(
                f"decoder_extra_up_sample_{i}", up.in_channels, up.out_channels, up.stride, up.bias
            )
            for i in (1, 2)
        )
        self.decoder_transformer = Transformer("decoder_transformer", c.decoder_transformer_kwargs, fast)
        dc = c.decoder_convnext_kwargs
        self.decoder_convnext = ConvNeXt(
            "decoder_convnext", dc.input_channels, dc.depths, dc.dims, dc.kernel_size
        )
        self.decoder_hifigan = HiFiGAN(c.decoder_hifigan_kwargs)

    # ---- checkpoint format ----
    def _released_layers(self) -> list[ReleasedLayer]:
        return [m for m in self.modules() if isinstance(m, ReleasedLayer)]

    def released_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every key of the released checkpoint for this config, with its shape."""
        shapes: dict[str, tuple[int, ...]] = {}
        for layer in self._released_layers():
            shapes.update(layer.released_shapes())
        return shapes

    @torch.no_grad()
    def load_released(self, sd: Mapping[str, Tensor]) -> None:
        """Set all weights from a released-format state dict (validated by the caller)."""
        for layer in self._released_layers():
            layer.load_released(sd)

    @torch.no_grad()
    def export_released(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for layer in self._released_layers():
            out.update({k: v if v.is_meta else v.cpu() for k, v in layer.export_released().items()})
        return out

    @torch.no_grad()
    def to_runtime(self, device: torch.device, dtype: torch.dtype) -> CodecModel:
        """Move to `device`, cast to `dtype` except float32-pinned tensors, pack CPU kernels."""
        for module in self.modules():
            keep_all = bool(getattr(module, "keep_float32", False))
            keep = set(getattr(module, "KEEP_FLOAT32", ()))
            for name, buf in list(module._buffers.items()):
                if buf is None:
                    continue
                if buf.is_floating_point():
                    target = torch.float32 if keep_all or name in keep else dtype
                    module._buffers[name] = buf.to(device=device, dtype=target)
                else:
                    module._buffers[name] = buf.to(device=device)
        self.compute_dtype = dtype
        for module in self.modules():
            if isinstance(module, Linear | CausalConv):
                module.prepare()
        return self.eval()

    # ---- streaming state ----
    def encoder_parts(self) -> list[nn.Module]:
        return [
            self.mel,
            self.encoder_convnext,
            self.encoder_transformer,
            self.down_sample_1,
            self.down_sample_2,
        ]

    def decoder_parts(self) -> list[nn.Module]:
        return [
            self.post_projector,
            self.vq_transformer,
            self.post_projector_of_vq_transformer,
            self.up_sample_1,
            self.up_sample_2,
            self.decoder_transformer,
            self.decoder_convnext,
            self.decoder_hifigan,
        ]

    @staticmethod
    def state_specs(parts: list[nn.Module]) -> dict[str, StateSpec]:
        specs: dict[str, StateSpec] = {}
        for part in parts:
            for m in part.modules():
                if isinstance(m, ReleasedLayer):
                    specs.update(m.state_specs())
        return specs

    # ---- whole utterance ----
    def encode(self, audio: Tensor, store: Intermediates | None = None) -> Tensor:
        """audio (B, N) float -> tokens (n_q, B, T), T = ceil((N // hop) / 4)."""
        return self.quantizer.encode(self.latent(audio, store))

    def latent(self, audio: Tensor, store: Intermediates | None = None) -> Tensor:
        """audio (B, N) -> the pre-quantisation latent z (B, T, code_dim)."""
        dtype = self.compute_dtype
        m = self.mel(audio)
        _record(store, "mel", m)
        x = self.encoder_convnext(m.to(dtype))
        _record(store, "encoder_convnext", x)
        x = self.encoder_transformer(x)
        _record(store, "encoder_transformer", x)
        x = self.down_sample_1(x)
        _record(store, "down_sample_1", x)
        z = self.down_sample_2(x)
        _record(store, "z", z)
        return z

    def decode(self, tokens: Tensor, store: Intermediates | None = None) -> Tensor:
        """tokens (n_q, B, T) -> audio (B, T * frame_samples) float32."""
        dtype = self.compute_dtype
        zq = self.quantizer.decode(tokens)
        _record(store, "zq", zq)
        x = self.post_projector(zq.to(dtype))
        _record(store, "post_projector", x)
        x = self.vq_transformer(x)
        _record(store, "vq_transformer", x)
        x = self.post_projector_of_vq_transformer(x)
        _record(store, "post_projector_of_vq_transformer", x)
        x = self.up_sample_1(x)
        _record(store, "up_sample_1", x)
        x = self.up_sample_2(x)
        _record(store, "up_sample_2", x)
        x = self.decoder_transformer(x)
        _record(store, "decoder_transformer", x)
        x = self.decoder_convnext(x)
        _record(store, "decoder_convnext", x)
        return self.decoder_hifigan(x).flatten(1)

    # ---- streaming ----
    def encode_step(self, audio: Tensor, ctx: StepContext) -> Tensor:
        """audio (n, k * frame_samples) -> tokens (n_q, n, k), advancing the slots' state."""
        dtype = self.compute_dtype
        x = self.encoder_convnext.step(self.mel.step(audio, ctx).to(dtype), ctx)
        x = self.encoder_transformer.step(x, ctx)
        z = self.down_sample_2.step(self.down_sample_1.step(x, ctx), ctx)
        return self.quantizer.encode(z)

    def decode_step(self, tokens: Tensor, ctx: StepContext) -> Tensor:
        """tokens (n_q, n, k) -> audio (n, k * frame_samples) float32, advancing the slots' state."""
        dtype = self.compute_dtype
        x = self.post_projector.step(self.quantizer.decode(tokens).to(dtype), ctx)
        x = self.vq_transformer.step(x, ctx)
        x = self.post_projector_of_vq_transformer.step(x, ctx)
        x = self.up_sample_2.step(self.up_sample_1.step(x, ctx), ctx)
        x = self.decoder_transformer.step(x, ctx)
        x = self.decoder_convnext.step(x, ctx)
        return self.decoder_hifigan.step(x, ctx).flatten(1)
