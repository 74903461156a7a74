"""Preallocated key/value storage and the attention kernels that read it.

Backbone: one ``KVPool`` holds, per layer, keys and values for ``slots + 1`` sessions and
``capacity + 1`` positions. The extra slot and the extra position column are scratch space that
padding rows write to, so a fixed-shape batch never disturbs a live session's cache. Layout
``bhtd`` (slot, kv head, position, dim) lets a contiguous range of slots be read as a view on CPU;
``bthd`` is the layout flash-attn's ``flash_attn_with_kvcache`` expects.

Patch decoder: ``LocalKV`` is a (rows, heads, group_size, dim) buffer per layer, rewritten for
every position (its sequence is always ``[downcast(h), frame 0, frame 1]``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class KVPool:
    def __init__(
        self,
        layers: int,
        slots: int,
        capacity: int,
        kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
        layout: str = "bhtd",
    ) -> None:
        if layout not in ("bhtd", "bthd"):
            raise ValueError(f"unknown KV layout {layout!r}")
        self.layout = layout
        self.slots = slots
        self.capacity = capacity
        self.scratch_slot = slots
        self.scratch_position = capacity
        if layout == "bhtd":
            shape = (slots + 1, kv_heads, capacity + 1, head_dim)
        else:
            shape = (slots + 1, capacity + 1, kv_heads, head_dim)
        # Zero-filled: masked-out entries are multiplied by zero weights and must be finite.
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def write(
        self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """slots, positions (N,); k, v (N, kv_heads, dim)."""
        if self.layout == "bhtd":
            self.k[layer][slots, :, positions] = k
            self.v[layer][slots, :, positions] = v
        else:
            self.k[layer][slots, positions] = k
            self.v[layer][slots, positions] = v

    def read(
        self, layer: int, rows: tuple[int, int] | torch.Tensor, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, kv_heads, length, dim) of a slot range ``(start, stop)`` (a view on
        ``bhtd``) or of the slots in an index tensor (a gathered copy)."""
        k, v = self.k[layer], self.v[layer]
        if self.layout == "bhtd":
            k, v = k[:, :, :length], v[:, :, :length]
        else:
            k, v = k[:, :length].transpose(1, 2), v[:, :length].transpose(1, 2)
        if isinstance(rows, tuple):
            return k[rows[0] : rows[1]], v[rows[0] : rows[1]]
        return k.index_select(0, rows), v.index_select(0, rows)


class LocalKV:
    """Per-layer (rows, heads, steps, dim) buffers for the patch decoder's 3-step sequence."""

    def __init__(
        self,
        layers: int,
        rows: int,
        heads: int,
        steps: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (rows, heads, steps, head_dim)
        self.rows = rows
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]


def attention_eager(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Grouped-query attention without repeating keys (matmul, scale, mask, float32 softmax, matmul).

    q (B,T,H,D); k, v (B,Hkv,Tk,D); bias None or additive (B,1,T,Tk). Returns (B,T,H*D).
    """
    b, t, h, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    g = h // hkv
    qg = q.view(b, t, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, g * t, d)
    scores = torch.matmul(qg, k.transpose(-1, -2)) * (d**-0.5)
    if bias is not None:
        scores = (scores.view(b, hkv, g, t, tk) + bias[:, :, None]).view(b, hkv, g * t, tk)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v)  # (B, Hkv, G*T, D)
    return out.view(b, hkv, g, t, d).permute(0, 3, 1, 2, 4).reshape(b, t, h * d)


def attention_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Same contract through ``scaled_dot_product_attention``; mask None or boolean (B,1,T,Tk)."""
    b, t, h, d = q.shape
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k, v, attn_mask=mask, enable_gqa=k.shape[1] != h
    )  # (B,H,T,D)
    return out.transpose(1, 2).reshape(b, t, h * d)


def flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return True
