"""The speech-text LM's modules: a Qwen2 decoder stack (backbone and patch decoder) and the speech parts.

This is our own compact implementation rather than transformers' ``Qwen2Model``: the layers take an
``attend`` callback, so the runtime decides where keys and values live (a preallocated per-slot
KV pool for the backbone, a tiny fixed buffer for the patch decoder) and the decode step keeps
fixed shapes. Parameter names follow the released checkpoint exactly (``model.*``, ``lm_head``,
``local_transformer.*``, ``local_transformer_lm_heads.*``, ``speech_embedddings.*`` with three d's,
``speech_group_downcast``, ``hidden_states_downcast``), so a checkpoint loads without renaming.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import LMConfig

# On CPU, MKL's GEMM for x @ W.T with a few rows of x and a large W (F.linear) is several times
# slower than computing (W @ x.T).T, which streams W once; a single row keeps F.linear's GEMV path.
SMALL_BATCH_ROWS = 64


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with a faster formulation for 2..64 rows on CPU (same result up to rounding)."""
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or not 2 <= rows <= SMALL_BATCH_ROWS:
        return F.linear(x, weight, bias)
    out = torch.mm(weight, x.reshape(rows, x.shape[-1]).t()).t()
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def apply_linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, module.weight, module.bias)


# attend(layer_index, q (B,T,H,D), k (B,T,Hkv,D), v (B,T,Hkv,D)) -> (B,T,H*D); q and k carry RoPE.
AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class SelfAttention(nn.Module):
    """Projections of a Qwen2 attention block (biased q/k/v, unbiased output)."""

    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.kv_heads = kv_heads
        self.head_dim = dim // heads
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(heads * self.head_dim, dim, bias=False)


class GatedMLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.silu(apply_linear(self.gate_proj, x))
        return apply_linear(self.down_proj, gate * apply_linear(self.up_proj, x))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B,T,H,D); cos/sin (B,T,1,D) in x's dtype."""
    return x * cos + rotate_half(x) * sin


def rope_table(head_dim: int, theta: float, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos/sin tables (length, head_dim) for positions 0..length-1 (Qwen2's default RoPE)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.arange(length, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, ffn: int, eps: float) -> None:
        super().__init__()
        self.self_attn = SelfAttention(dim, heads, kv_heads)
        self.mlp = GatedMLP(dim, ffn)
        self.input_layernorm = RMSNorm(dim, eps)
        self.post_attention_layernorm = RMSNorm(dim, eps)

    def forward(
        self, index: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: AttendFn
    ) -> torch.Tensor:
        b, t, _ = x.shape
        a = self.self_attn
        h = self.input_layernorm(x)
        q = apply_linear(a.q_proj, h).view(b, t, a.heads, a.head_dim)
        k = apply_linear(a.k_proj, h).view(b, t, a.kv_heads, a.head_dim)
        v = apply_linear(a.v_proj, h).view(b, t, a.kv_heads, a.head_dim)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        x = x + apply_linear(a.o_proj, attend(index, q, k, v))
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """A Qwen2 decoder stack; ``embed_tokens`` only for the backbone (the patch decoder has none)."""

    def __init__(
        self,
        dim: int,
        layers: int,
        heads: int,
        kv_heads: int,
        ffn: int,
        eps: float,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        if vocab_size is not None:
            self.embed_tokens = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList(DecoderLayer(dim, heads, kv_heads, ffn, eps) for _ in range(layers))
        self.norm = RMSNorm(dim, eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: AttendFn
    ) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(i, x, cos, sin, attend)
        return self.norm(x)


class SG2Model(nn.Module):
    """Backbone + text head + patch decoder + speech embeddings, with the checkpoint's parameter names."""

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.model = DecoderStack(
            c.hidden_size,
            c.num_layers,
            c.num_heads,
            c.num_kv_heads,
            c.intermediate_size,
            c.rms_norm_eps,
            c.vocab_size,
        )
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.local_transformer = DecoderStack(
            c.local_dim, c.local_layers, c.local_heads, c.local_heads, c.local_ffn_dim, c.rms_norm_eps
        )
        self.local_transformer_lm_heads = nn.ModuleList(
            nn.Linear(c.local_dim, c.speech_vocab_size, bias=False) for _ in range(c.n_vq)
        )
        self.speech_embedddings = nn.ModuleList(
            nn.Embedding(c.speech_vocab_size, c.local_dim) for _ in range(c.n_vq)
        )
        self.speech_group_downcast = nn.Linear(c.local_dim * c.group_size, c.hidden_size, bias=False)
        self.hidden_states_downcast = nn.Linear(c.hidden_size, c.local_dim, bias=False)
        self.tie_speech_heads()

    def tie_speech_heads(self) -> None:
        """The patch decoder's output heads share their weights with the speech embeddings."""
        for head, emb in zip(self.local_transformer_lm_heads, self.speech_embedddings, strict=True):
            head.weight = emb.weight

    # -- pieces used by the runtime ----------------------------------------------------------------
    def speech_sum(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (..., n_vq) -> sum over codebooks of their embeddings (..., local_dim)."""
        out = self.speech_embedddings[0](codes[..., 0])
        for c in range(1, self.config.n_vq):
            out = out + self.speech_embedddings[c](codes[..., c])
        return out

    def embed_positions(self, text: torch.Tensor, speech: torch.Tensor) -> torch.Tensor:
        """Input embeddings of positions: text (B,T), speech (B,T,group,n_vq) -> (B,T,hidden)."""
        b, t = text.shape
        grouped = self.speech_sum(speech).reshape(b, t, self.config.group_size * self.config.local_dim)
        return self.model.embed_tokens(text) + apply_linear(self.speech_group_downcast, grouped)

    def speech_logits(self, local_hidden: torch.Tensor) -> torch.Tensor:
        """Patch-decoder output (B, local_dim) -> logits (B, n_vq, speech_vocab) through the tied heads."""
        return torch.stack(
            [apply_linear(head, local_hidden) for head in self.local_transformer_lm_heads], dim=1
        )

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return apply_linear(self.lm_head, hidden)

    def downcast(self, hidden: torch.Tensor) -> torch.Tensor:
        return apply_linear(self.hidden_states_downcast, hidden)
