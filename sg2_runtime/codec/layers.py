"""Convolutional building blocks, channels-last, each with a whole-utterance and a streaming path.

Every layer here is a :class:`ReleasedLayer`: it knows which entries of the released checkpoint
it owns (key names and shapes), folds weight normalisation when loading them, and can write them
back in the released format (for random checkpoints). Activations are (batch, time, channels)
throughout so that every channel mix is a row-wise matmul (see `kernels.py`).

Streaming layers keep their left context in the per-slot :class:`~.state.StreamState`, keyed by
the layer's released prefix, so modules themselves stay stateless and shareable.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernels import ONEDNN, Linear, depthwise_taps, im2col, layer_norm
from .state import StateSpec, StepContext

_PACKED_CONV_MAX_STEPS = 128

WN_G = ".parametrizations.weight.original0"
WN_V = ".parametrizations.weight.original1"


def wn_shapes(prefix: str, weight_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Released keys of a weight-normalised weight: magnitude g (dim 0 kept) and direction v."""
    g_shape = (weight_shape[0],) + (1,) * (len(weight_shape) - 1)
    return {prefix + WN_G: g_shape, prefix + WN_V: tuple(weight_shape)}


def fold_weight_norm(sd: Mapping[str, Tensor], prefix: str) -> Tensor:
    """g * v / ||v|| (norm over all dims but the first), computed once at load time."""
    g, v = sd[prefix + WN_G].float(), sd[prefix + WN_V].float()
    return torch._weight_norm(v, g, 0)


def unfold_weight_norm(prefix: str, weight: Tensor) -> dict[str, Tensor]:
    """Inverse of :func:`fold_weight_norm` (v = w, g = ||w||): the released storage format."""
    w = weight.detach().float()
    g = w.flatten(1).norm(dim=1).view(-1, *([1] * (w.dim() - 1)))
    return {prefix + WN_G: g.clone(), prefix + WN_V: w.clone()}


class ReleasedLayer(nn.Module):
    """A module owning some entries of the released checkpoint (children own their own)."""

    def released_shapes(self) -> dict[str, tuple[int, ...]]:
        return {}

    def load_released(self, sd: Mapping[str, Tensor]) -> None:
        """Set this module's own tensors from a validated released state dict."""

    def export_released(self) -> dict[str, Tensor]:
        return {}

    def state_specs(self) -> dict[str, StateSpec]:
        return {}


class WNLinear(ReleasedLayer):
    """A weight-normalised `nn.Linear` of the reference (keys `{ref}.parametrizations...`)."""

    def __init__(self, ref: str, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.ref = ref
        self.lin = Linear(in_features, out_features, bias)

    def released_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = wn_shapes(self.ref, (self.lin.out_features, self.lin.in_features))
        if self.lin.bias is not None:
            shapes[self.ref + ".bias"] = (self.lin.out_features,)
        return shapes

    def load_released(self, sd: Mapping[str, Tensor]) -> None:
        self.lin.weight.copy_(fold_weight_norm(sd, self.ref))
        if self.lin.bias is not None:
            self.lin.bias.copy_(sd[self.ref + ".bias"])

    def export_released(self) -> dict[str, Tensor]:
        out = unfold_weight_norm(self.ref, self.lin.weight)
        if self.lin.bias is not None:
            out[self.ref + ".bias"] = self.lin.bias.detach().float().clone()
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x)


class Norm(ReleasedLayer):
    """LayerNorm over channels (`{ref}.weight`, `{ref}.bias`)."""

    def __init__(self, ref: str, dim: int, eps: float):
        super().__init__()
        self.ref = ref
        self.eps = eps
        self.register_buffer("weight", torch.ones(dim))
        self.register_buffer("bias", torch.zeros(dim))

    def released_shapes(self) -> dict[str, tuple[int, ...]]:
        return {self.ref + ".weight": tuple(self.weight.shape), self.ref + ".bias": tuple(self.bias.shape)}

    def load_released(self, sd: Mapping[str, Tensor]) -> None:
        self.weight.copy_(sd[self.ref + ".weight"])
        self.bias.copy_(sd[self.ref + ".bias"])

    def export_released(self) -> dict[str, Tensor]:
        return {
            self.ref + ".weight": self.weight.float().clone(),
            self.ref + ".bias": self.bias.float().clone(),
        }

    def forward(self, x: Tensor) -> Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps)


class CausalConv(ReleasedLayer):
    """Causal 1-D convolution: dense, grouped or depthwise; stride 1, or 2 for the resamplers.

    `pad_mode="zeros"` is the AudioDec-style conv (zero left context, `{pad_ref}` buffer in the
    checkpoint); `"replicate"` is the moshi-style resampler (left context = first frame; an odd
    whole-utterance length also gets one replicated frame on the right, as the reference does).
    `conv_ref` is the released prefix holding the (weight-normalised) weight and bias.

    Kernels (all batch-size independent, see kernels.py): depthwise -> per-tap multiply-adds;
    dense -> im2col + :class:`Linear`; grouped (HiFi-GAN) -> oneDNN's grouped convolution, which
    takes (B, C, T) input, so grouped convs are `channels_first` (others are channels-last).
    """

    def __init__(
        self,
        conv_ref: str,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        dilation: int = 1,
        groups: int = 1,
        stride: int = 1,
        bias: bool = True,
        pad_mode: str = "zeros",
        pad_ref: str | None = None,
    ):
        super().__init__()
        self.conv_ref = conv_ref
        self.pad_ref = pad_ref
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.dilation, self.groups, self.stride = kernel_size, dilation, groups, stride
        self.pad_mode = pad_mode
        self.has_bias = bias
        # Left context a call needs: (K-1)*d for stride 1; K - stride for the resamplers.
        self.context = (kernel_size - 1) * dilation if stride == 1 else kernel_size - stride
        self.depthwise = groups > 1 and groups == in_channels == out_channels
        self.channels_first = groups > 1 and not self.depthwise
        self.time_dim = 2 if self.channels_first else 1
        self.lins = nn.ModuleList()
        if self.depthwise:
            self.register_buffer("taps", torch.zeros(kernel_size, in_channels))
            self.register_buffer("bias", torch.zeros(out_channels) if bias else None)
        elif self.channels_first:
            self.register_buffer("weight", torch.zeros(self.weight_shape))
            self.register_buffer("bias", torch.zeros(out_channels) if bias else None)
            self._packed: Tensor | None = None
        else:
            self.lins.append(Linear(kernel_size * in_channels, out_channels, bias))

    @property
    def weight_shape(self) -> tuple[int, int, int]:
        return (self.out_channels, self.in_channels // self.groups, self.kernel_size)

    def released_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        if self.pad_ref is not None:
            shapes[self.pad_ref] = (1, self.in_channels, self.context)
        if self.has_bias:
            shapes[self.conv_ref + ".bias"] = (self.out_channels,)
        shapes.update(wn_shapes(self.conv_ref, self.weight_shape))
        return shapes

    def load_released(self, sd: Mapping[str, Tensor]) -> None:
        w = fold_weight_norm(sd, self.conv_ref)  # (Cout, Cin/g, K)
        b = sd[self.conv_ref + ".bias"] if self.has_bias else None
        if self.depthwise:
            self.taps.copy_(w[:, 0, :].t())
        elif self.channels_first:
            self.weight.copy_(w)
        else:  # tap-major columns, matching im2col
            self.lins[0].weight.copy_(w.permute(0, 2, 1).reshape(self.out_channels, -1))
        if b is not None:
            (self.lins[0].bias if self.lins else self.bias).copy_(b)

    def export_released(self) -> dict[str, Tensor]:
        if self.depthwise:
            w, b = self.taps.float().t().unsqueeze(1), self.bias
        elif self.channels_first:
            w, b = self.weight, self.bias
        else:
            lin = self.lins[0]
            w = (
                lin.weight.float()
                .view(self.out_channels, self.kernel_size, self.in_channels)
                .permute(0, 2, 1)
            )
            b = lin.bias
        out: dict[str, Tensor] = {}
        if self.pad_ref is not None:
            out[self.pad_ref] = torch.zeros(1, self.in_channels, self.context)
        if b is not None:
            out[self.conv_ref + ".bias"] = b.detach().float().clone()
        out.update(unfold_weight_norm(self.conv_ref, w))
        return out

    def state_specs(self) -> dict[str, StateSpec]:
        if self.context == 0:
            return {}
        keep = bool(getattr(self, "keep_float32", False))
        shape = (self.in_channels, self.context) if self.channels_first else (self.context, self.in_channels)
        return {self.conv_ref + ".ctx": StateSpec(shape, float32=keep)}

    def prepare(self) -> None:
        """Pre-pack the grouped kernel for oneDNN (CPU float32) once, for short streaming calls."""
        if not self.channels_first:
            return
        self._packed = None
        w = self.weight
        if ONEDNN and w.device.type == "cpu" and w.dtype == torch.float32:
            self._packed = torch.ops.mkldnn._reorder_convolution_weight(
                w.unsqueeze(2), [0, 0], [1, 1], [1, self.dilation], self.groups, [1, self.in_channels, 1, 64]
            )

    def _grouped(self, padded: Tensor) -> Tensor:
        # The kernel is chosen by the call's length only, never by the batch, so a slot gets the
        # same bits alone or in a batch. Pre-packed weights win for short calls (streaming: no
        # per-call weight reorder); plain conv1d is as fast or faster for long ones.
        steps = padded.shape[-1] - self.context
        if self._packed is not None and padded.device.type == "cpu" and steps <= _PACKED_CONV_MAX_STEPS:
            y = torch.ops.mkldnn._convolution_pointwise(
                padded.unsqueeze(2),
                self._packed,
                self.bias,
                [0, 0],
                [1, 1],
                [1, self.dilation],
                self.groups,
                "none",
                [],
                "",
            )
            return y.squeeze(2)
        return F.conv1d(padded, self.weight, self.bias, dilation=self.dilation, groups=self.groups)

    def _apply(self, padded: Tensor) -> Tensor:
        """Convolve an already left-padded input (channels-last, or (B, C, Tp) if grouped)."""
        if self.depthwise:
            return depthwise_taps(padded, self.taps, self.bias, self.dilation)
        if self.channels_first:
            return self._grouped(padded)
        if self.kernel_size == 1:
            return self.lins[0](padded[:, :: self.stride])
        cols = im2col(padded, self.kernel_size, self.dilation, self.stride, 1)
        return self.lins[0](cols[0]).view(padded.shape[0], -1, self.out_channels)

    def forward(self, x: Tensor) -> Tensor:
        if self.context == 0:
            return self._apply(x)
        if self.pad_mode == "zeros":
            padded = F.pad(x, (self.context, 0) if self.channels_first else (0, 0, self.context, 0))
        else:  # replicate (channels-last resamplers only)
            extra = (self.stride - x.shape[1] % self.stride) % self.stride
            pieces = [x[:, :1].expand(-1, self.context, -1), x]
            if extra:
                pieces.append(x[:, -1:].expand(-1, extra, -1))
            padded = torch.cat(pieces, dim=1)
        return self._apply(padded)

    def step(self, x: Tensor, ctx: StepContext) -> Tensor:
        if self.context == 0:
            return self._apply(x)
        key = self.conv_ref + ".ctx"
        buf = ctx.read(key)
        if self.pad_mode == "replicate":
            buf = ctx.replicate_first_if_fresh(buf, x)
        window = torch.cat([buf, x], dim=self.time_dim)
        ctx.write(key, window.narrow(self.time_dim, window.shape[self.time_dim] - self.context, self.context))
        return self._apply(window)


class CausalConvTranspose(ReleasedLayer):
    """Causal transposed conv with kernel = 2 * stride (the reference trims `stride` each side).

    Output frame t*s + r = W[:, :, r]^T x[t] + W[:, :, r+s]^T x[t-1] + b, with x[-1] := x[0]
    (the reference's replicate padding). One matmul gives both halves ("head", "tail") for every
    input frame; streaming keeps the last frame's tail as state, so no frame is computed twice.
    """

    def __init__(self, ref: str, in_channels: int, out_channels: int, stride: int, bias: bool):
        super().__init__()
        self.ref = ref
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.lin = Linear(in_channels, 2 * stride * out_channels, bias=False)
        self.register_buffer("bias", torch.zeros(out_channels) if bias else None)

    def released_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {self.ref + ".pad_buffer": (1, self.in_channels, 1)}
        if self.bias is not None:
            shapes[self.ref + ".deconv.bias"] = (self.out_channels,)
        shapes.update(wn_shapes(self.ref + ".deconv", (self.in_channels, self.out_channels, 2 * self.stride)))
        return shapes

    def load_released(self, sd: Mapping[str, Tensor]) -> None:
        w = fold_weight_norm(sd, self.ref + ".deconv")  # (Cin, Cout, 2s)
        self.lin.weight.copy_(w.permute(2, 1, 0).reshape(-1, self.in_channels))
        if self.bias is not None:
            self.bias.copy_(sd[self.ref + ".deconv.bias"])

    def export_released(self) -> dict[str, Tensor]:
        k = 2 * self.stride
        w = self.lin.weight.float().view(k, self.out_channels, self.in_channels).permute(2, 1, 0)
        out = {self.ref + ".pad_buffer": torch.zeros(1, self.in_channels, 1)}
        if self.bias is not None:
            out[self.ref + ".deconv.bias"] = self.bias.detach().float().clone()
        out.update(unfold_weight_norm(self.ref + ".deconv", w))
        return out

    def state_specs(self) -> dict[str, StateSpec]:
        return {self.ref + ".tail": StateSpec((self.stride, self.out_channels))}

    def _halves(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, t, _ = x.shape
        z = self.lin(x).view(b, t, 2, self.stride, self.out_channels)
        return z[:, :, 0], z[:, :, 1]

    def _combine(self, head: Tensor, prev_tail: Tensor) -> Tensor:
        y = head + prev_tail
        if self.bias is not None:
            y = y + self.bias
        b, t = y.shape[:2]
        return y.reshape(b, t * self.stride, self.out_channels)

    def forward(self, x: Tensor) -> Tensor:
        head, tail = self._halves(x)
        prev_tail = torch.cat([tail[:, :1], tail[:, :-1]], dim=1)
        return self._combine(head, prev_tail)

    def step(self, x: Tensor, ctx: StepContext) -> Tensor:
        key = self.ref + ".tail"
        head, tail = self._halves(x)
        prev = ctx.read(key).unsqueeze(1)
        if ctx.any_fresh:
            prev = torch.where(ctx.fresh_mask.view(-1, 1, 1, 1), tail[:, :1], prev)
        prev_tail = torch.cat([prev, tail[:, :-1]], dim=1)
        ctx.write(key, tail[:, -1])
        return self._combine(head, prev_tail)
