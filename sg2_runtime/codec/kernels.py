"""Compute primitives whose per-row results do not depend on how many rows are computed together.

Why this file exists: batched streaming must give every slot exactly the numbers it would get
alone (so a call's audio never depends on who else is being served at the time). On CPU the stock
kernels break that: MKL's sgemm takes different code paths for 1..11 rows than for 12+ rows, and
`F.conv1d` / `conv_transpose1d` for dense kernels use another algorithm at batch 1 than at batch
> 1, so the same input row gives outputs that differ in the last bits depending on the batch size.

Channel mixing therefore goes through :class:`Linear`, which on CPU float32 uses oneDNN's
inner-product primitive with the weight reordered ("packed") once at load time. That primitive
computes each output row the same way for any row count >= 2 (a single row takes a separate
matrix-vector path when K > 1024, so one row is padded to two), and it is 1.5-3x faster than
`F.linear` for the few-row matmuls streaming produces. Where it is unavailable (other dtypes,
builds without oneDNN), small CPU matmuls are padded to `_MIN_ROWS` rows, which puts MKL on its
row-count-independent path. Dense convolutions are im2col + `Linear`, transposed convolutions
`Linear` + overlap-add, depthwise ones per-tap multiply-adds (elementwise, so independent by
construction); the grouped HiFi-GAN convolutions use oneDNN's grouped convolution, whose
per-sample results do not depend on the batch (checked at the real shapes in
tests/test_codec_kernels.py).

On CUDA the guarantee is not claimed (cuBLAS picks kernels by shape); `F.linear` is used as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_MIN_ROWS = 16


def _onednn_packing_available() -> bool:
    try:
        return bool(
            torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight")
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
        )
    except (AttributeError, RuntimeError):  # pragma: no cover - depends on the torch build
        return False


ONEDNN = _onednn_packing_available()


class Linear(nn.Module):
    """`y = x W^T + b` over the last dim, with a batch-size-independent CPU kernel.

    `weight` (out, in) and `bias` are plain buffers (weight norm is folded before they are set);
    call :meth:`prepare` after the weights are final and on their device/dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._packed: Tensor | None = None

    def prepare(self) -> None:
        """Pack the weight for oneDNN once (CPU float32 only); other devices use it as is."""
        self._packed = None
        w = self.weight
        if ONEDNN and w.device.type == "cpu" and w.dtype == torch.float32:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), None)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        rows = x2.shape[0]
        if rows == 0:
            return x.new_zeros(*lead, self.out_features)
        if self._packed is not None and x2.device.type == "cpu" and x2.dtype == torch.float32:
            if rows == 1:  # one row would take the matrix-vector path: different rounding
                x2 = torch.cat([x2, x2.new_zeros(1, self.in_features)])
            y = torch.ops.mkldnn._linear_pointwise(x2.contiguous(), self._packed, self.bias, "none", [], "")
            y = y[:rows]
        elif x2.device.type == "cpu" and rows < _MIN_ROWS:
            padded = x2.new_zeros(_MIN_ROWS, self.in_features)
            padded[:rows] = x2
            y = F.linear(padded, self.weight, self.bias)[:rows]
        else:
            y = F.linear(x2, self.weight, self.bias)
        return y.view(*lead, self.out_features)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """LayerNorm over the last (channel) dim; computed in float32 for half-precision inputs."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps).to(x.dtype)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def depthwise_taps(x: Tensor, taps: Tensor, bias: Tensor | None, dilation: int = 1) -> Tensor:
    """Depthwise 1-D convolution (channels-last) over an already left-padded input.

    x: (B, T + (K-1)*dilation, C); taps: (K, C). Returns (B, T, C). Written as K fused
    multiply-adds so each output element is computed alone (no batch-dependent kernel choice).
    """
    k = taps.shape[0]
    t_out = x.shape[1] - (k - 1) * dilation
    y = x[:, 0:t_out] * taps[0] if bias is None else torch.addcmul(bias, x[:, 0:t_out], taps[0])
    for j in range(1, k):
        start = j * dilation
        y.addcmul_(x[:, start : start + t_out], taps[j])
    return y


def im2col(x: Tensor, kernel: int, dilation: int, stride: int, groups: int) -> Tensor:
    """Unfold a left-padded channels-last signal into matmul rows, tap-major within each group.

    x: (B, Tp, C) with C = groups * Cg. Returns (groups, B * T_out, kernel * Cg) contiguous, where
    row (b, t) of group g is [x[b, t*stride + j*dilation, g*Cg:(g+1)*Cg] for j in 0..kernel-1].
    """
    b, tp, c = x.shape
    cg = c // groups
    t_out = (tp - (kernel - 1) * dilation - 1) // stride + 1
    cols = x.new_empty(groups, b, t_out, kernel, cg)
    xg = x.view(b, tp, groups, cg).permute(2, 0, 1, 3)  # (G, B, Tp, Cg)
    span = (t_out - 1) * stride + 1
    for j in range(kernel):
        start = j * dilation
        cols[:, :, :, j, :] = xg[:, :, start : start + span : stride, :]
    return cols.view(groups, b * t_out, kernel * cg)
