"""Vectorised sampling for the text head and the speech heads, with per-session counter-based randomness.

Processing follows the reference (transformers' warpers in this order): temperature, top-k (ties
with the k-th value kept), top-p (smallest set whose mass reaches p, at least one token); for speech
heads the zero-embedding index is removed *after* that processing when sampling. Greedy rows take
the arg-max of the raw logits (the reference does not exclude the zero-embedding index there).

Randomness: one uniform number per (session seed, position, head) from a 32-bit integer hash,
computed for the whole batch in a few tensor ops, then inverse-CDF sampling over the kept tokens.
A session's draws therefore do not depend on which other sessions share the batch, need no
per-session generator objects, and repeat exactly when the same position is decoded again after
a rollback. Everything here has fixed shapes (no host synchronisation) except the optional
coverage fallback of :func:`sample_rows` in eager mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_M32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # < 2**27: products of 32-bit values stay below 2**63 in int64
_GOLDEN = 0x9E3779B1


@dataclass(frozen=True)
class SamplingParams:
    """How a session samples: ``greedy`` ignores the rest. ``top_k=0`` / ``top_p=1`` disable those filters.

    The defaults are the reference demo's effective settings: temperature 0.8, top-p 0.9 and
    transformers' default top-k of 50 (its ``GenerationConfig`` applies that unless told otherwise).
    """

    temperature: float = 0.8
    top_p: float = 0.9
    top_k: int = 50
    greedy: bool = False

    def __post_init__(self) -> None:
        if not self.greedy and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def filters(self) -> bool:
        return self.top_k > 0 or self.top_p < 1


GREEDY = SamplingParams(greedy=True)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * _MIX) & _M32
    x = x ^ (x >> 16)
    x = (x * _MIX) & _M32
    return x ^ (x >> 16)


def counter_uniforms(seeds: torch.Tensor, positions: torch.Tensor, streams: int) -> torch.Tensor:
    """(B,) int64 seeds and positions -> (B, streams) float32 uniforms in (0, 1)."""
    key = _mix32((seeds & _M32) ^ _mix32((seeds >> 32) & _M32))
    base = _mix32(key ^ _mix32(positions & _M32))
    stream = (torch.arange(streams, device=seeds.device, dtype=torch.int64) + 1) * _GOLDEN & _M32
    x = _mix32(base[:, None] ^ _mix32(stream)[None, :])
    return ((x >> 8).to(torch.float32) + 0.5) / float(1 << 24)


@dataclass
class RowParams:
    """Per-row sampling settings of a batch, as tensors on the compute device."""

    temperature: torch.Tensor  # (B,) float32, 1.0 on greedy rows
    top_k: torch.Tensor  # (B,) int64, 0 = off
    top_p: torch.Tensor  # (B,) float32, 1.0 = off
    greedy: torch.Tensor  # (B,) bool
    max_top_k: int  # largest top_k of the sampled rows; 0 when one of them has top_k == 0
    any_filter: bool  # some sampled row uses top-k or top-p
    any_unfiltered: bool  # some sampled row uses neither
    all_greedy: bool

    @classmethod
    def build(cls, params: list[SamplingParams], device: torch.device) -> RowParams:
        temps = [1.0 if p.greedy else float(p.temperature) for p in params]
        ks = [0 if p.greedy else int(p.top_k) for p in params]
        ps = [1.0 if p.greedy else float(p.top_p) for p in params]
        sampled = [p for p in params if not p.greedy]
        max_top_k = 0 if any(p.top_k == 0 for p in sampled) else max((p.top_k for p in sampled), default=0)
        return cls(
            temperature=torch.tensor(temps, dtype=torch.float32, device=device),
            top_k=torch.tensor(ks, dtype=torch.int64, device=device),
            top_p=torch.tensor(ps, dtype=torch.float32, device=device),
            greedy=torch.tensor([p.greedy for p in params], dtype=torch.bool, device=device),
            max_top_k=max_top_k,
            any_filter=any(p.filters for p in sampled),
            any_unfiltered=any(not p.filters for p in sampled),
            all_greedy=not sampled,
        )

    def _map(self, fn) -> RowParams:
        return RowParams(
            temperature=fn(self.temperature),
            top_k=fn(self.top_k),
            top_p=fn(self.top_p),
            greedy=fn(self.greedy),
            max_top_k=self.max_top_k,
            any_filter=self.any_filter,
            any_unfiltered=self.any_unfiltered,
            all_greedy=self.all_greedy,
        )

    def repeat(self, n: int) -> RowParams:
        """Each row repeated n times (row-major), for sampling several heads of a row at once."""
        return self._map(lambda t: t[:, None].expand(-1, n).reshape(-1))

    def select(self, index: torch.Tensor) -> RowParams:
        return self._map(lambda t: t.index_select(0, index))


def _filtered_candidates(
    scaled: torch.Tensor, rp: RowParams, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k/top-p filtering over the k best candidates of each row.

    Returns (probs, indices, keep, covered): candidate probabilities under the row's filtered
    distribution (top-k rows: renormalised over their top-k; others: over the whole vocabulary),
    their vocabulary indices, which are kept, and whether the k candidates were enough to decide
    the row's top-p set exactly.
    """
    v = scaled.shape[-1]
    if k >= v:
        vals, idx = scaled.sort(dim=-1, descending=True)
        k = v
    else:
        vals, idx = scaled.topk(k, dim=-1)
    has_k = rp.top_k > 0
    kth = vals.gather(1, (rp.top_k.clamp(1, k) - 1)[:, None])
    keep = (vals >= kth) | ~has_k[:, None]
    filtered = vals.masked_fill(~keep, float("-inf"))
    norm = torch.where(has_k, torch.logsumexp(filtered, dim=-1), torch.logsumexp(scaled, dim=-1))
    probs = torch.exp(filtered - norm[:, None])
    cum = probs.cumsum(dim=-1)
    keep = keep & ((cum - probs) < rp.top_p[:, None])
    keep[:, 0] = True
    covered = has_k | (cum[:, -1] >= rp.top_p) if k < v else torch.ones_like(has_k)
    return probs, idx, keep, covered


def _draw(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw of one column per row from non-negative weights (at least one positive)."""
    cdf = weights.cumsum(dim=-1)
    target = u[:, None] * cdf[:, -1:]
    j = torch.searchsorted(cdf, target, right=True)
    return j.clamp_(max=weights.shape[-1] - 1).squeeze(1)


def sample_rows(
    logits: torch.Tensor,
    rp: RowParams,
    u: torch.Tensor,
    *,
    exclude: int | None = None,
    candidates: int = 1024,
    static: bool = False,
) -> torch.Tensor:
    """Sample one token per row of ``logits`` (B, V) (float32) -> (B,) int64.

    ``u`` (B,) are the rows' uniforms. ``exclude`` is an index never sampled (greedy rows may still
    pick it, as in the reference). Rows without top-k/top-p filtering sample from the full
    distribution directly. Filtered rows consider the ``candidates`` best tokens; in eager mode a
    row whose top-p set might extend past them is redone over the full sorted vocabulary, in
    ``static`` mode (fixed shapes for graph capture) pass ``candidates >= V`` to stay exact.
    """
    greedy_tok = logits.argmax(dim=-1)
    if rp.all_greedy and not static:
        return greedy_tok
    v = logits.shape[-1]
    scaled = logits / rp.temperature[:, None]
    filtering = rp.top_k.gt(0) | rp.top_p.lt(1)

    tok = greedy_tok
    if rp.any_unfiltered or static:
        # Unfiltered rows: plain softmax over the vocabulary.
        full = torch.softmax(scaled, dim=-1)
        if exclude is not None:
            full[:, exclude] = 0
        tok = _draw(full, u)
    if not rp.any_filter and not static:
        return torch.where(rp.greedy, greedy_tok, tok)

    if static or candidates >= v:
        k = min(candidates, v)
    else:
        k = min(rp.max_top_k if rp.max_top_k > 0 else candidates, v)
    probs, idx, keep, covered = _filtered_candidates(scaled, rp, k)
    if not static and k < v and not bool(covered[filtering].all()):
        probs, idx, keep, covered = _filtered_candidates(scaled, rp, v)
    if exclude is not None:
        allowed = idx != exclude
        keep = keep & allowed
        # Nothing left (the excluded index was the only kept one): take the best allowed candidate.
        first_allowed = allowed.to(torch.int8).argmax(dim=-1, keepdim=True)
        keep.scatter_(1, first_allowed, keep.gather(1, first_allowed) | ~keep.any(dim=-1, keepdim=True))
    j = _draw(probs * keep, u)
    ftok = idx.gather(1, j[:, None]).squeeze(1)
    tok = torch.where(filtering, ftok, tok)
    return torch.where(rp.greedy, greedy_tok, tok)
