"""Residual vector quantiser: nearest codeword by Euclidean distance, 3 stages, in float32.

Distances are formed exactly as in training, `-(|x|^2 - 2 x.e + |e|^2)`, with `|e|^2`
computed once at load time; the winner is the first maximum. Codebooks stay float32 whatever
the model dtype, because a half-precision distance can flip the nearest codeword.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import QuantizerConfig
from .kernels import Linear
from .layers import ReleasedLayer

REF = "quantizer.codebook.layers"


class ResidualVQ(ReleasedLayer):
    KEEP_FLOAT32 = ("embed_sq",)

    def __init__(self, cfg: QuantizerConfig):
        super().__init__()
        self.n_q, self.size, self.dim = cfg.codebook_num, cfg.codebook_size, cfg.code_dim
        # codebooks[i].weight is codebook i (size, dim): Linear gives x . e for every codeword.
        self.codebooks = nn.ModuleList(Linear(self.dim, self.size, bias=False) for _ in range(self.n_q))
        for lin in self.codebooks:
            lin.keep_float32 = True
        self.register_buffer("embed_sq", torch.zeros(self.n_q, 1, self.size))

    def released_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for i in range(self.n_q):
            shapes[f"{REF}.{i}.inited"] = (1,)
            shapes[f"{REF}.{i}.cluster_size"] = (self.size,)
            shapes[f"{REF}.{i}.embed"] = (self.size, self.dim)
            shapes[f"{REF}.{i}.embed_avg"] = (self.size, self.dim)
        return shapes

    def load_released(self, sd: Mapping[str, Tensor]) -> None:
        for i, lin in enumerate(self.codebooks):
            embed = sd[f"{REF}.{i}.embed"].float()
            lin.weight.copy_(embed)
            self.embed_sq[i].copy_(embed.t().pow(2).sum(0, keepdim=True))

    def export_released(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for i, lin in enumerate(self.codebooks):
            embed = lin.weight.float().clone()
            out[f"{REF}.{i}.inited"] = torch.ones(1)
            out[f"{REF}.{i}.cluster_size"] = torch.ones(self.size)
            out[f"{REF}.{i}.embed"] = embed
            out[f"{REF}.{i}.embed_avg"] = embed.clone()
        return out

    def encode(self, z: Tensor) -> Tensor:
        """(B, T, dim) -> tokens (n_q, B, T) int64."""
        b, t, _ = z.shape
        residual = z.float().reshape(-1, self.dim)
        indices = []
        for i, lin in enumerate(self.codebooks):
            dist = -(residual.pow(2).sum(1, keepdim=True) - 2 * lin(residual) + self.embed_sq[i])
            ind = dist.max(dim=-1).indices
            indices.append(ind)
            residual = residual - F.embedding(ind, lin.weight)
        return torch.stack(indices).view(self.n_q, b, t)

    def decode(self, tokens: Tensor) -> Tensor:
        """tokens (n_q, B, T) -> sum of the chosen codewords (B, T, dim) float32."""
        out = F.embedding(tokens[0], self.codebooks[0].weight)
        for i in range(1, self.n_q):
            out = out + F.embedding(tokens[i], self.codebooks[i].weight)
        return out
