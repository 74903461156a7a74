"""Batched incremental decoding of the speech-text LM for many live sessions.

Each session owns a slot of a KV pool preallocated at load time (``max_sessions`` x
``max_positions``). A session's history is a sequence of LM positions; ``prefill`` appends
positions the caller builds (prompt pieces, user speech as it arrives), ``step`` appends one
position the model generates. Both leave a *pending* hidden state: the backbone output of the
last position, not yet turned into a token. ``step`` samples from it (text head, then the patch
decoder's 3 frames when in speech mode), runs the backbone on that new position so the cache
again equals the history, and keeps the new pending state. ``rollback`` trims the history; the
pending state is then unknown until the next ``prefill``.

Modality (the reference's rule): a session is in speech mode while its text channel holds more
``<|sosp|>`` than ``<|eosp|>`` (tracked with a per-position running count, so a rollback needs no
rescan). In speech mode a step's frames come from the patch decoder, except on a step whose text
token is ``<|eosp|>``; otherwise they are the zero-embedding index.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import secrets
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import LMConfig
from .kv import KVPool, LocalKV, attention_eager, attention_sdpa, flash_available
from .loading import LMCheckpointError, load_weights
from .model import SG2Model, rope_table
from .prompt import PromptFormat
from .sampling import RowParams, SamplingParams, counter_uniforms, sample_rows
from .tokens import SpecialTokens, TokenizerError, load_tokenizer, resolve_special_tokens

log = logging.getLogger(__name__)

FINISH_EOS = "eos"
FINISH_LENGTH = "length"
_SEED_MASK = (1 << 63) - 1


class CapacityError(RuntimeError):
    """No free session slot, or a session's history would not fit in ``max_positions``."""


class LMStateError(RuntimeError):
    """An operation that the session's state does not allow (e.g. ``step`` without a pending state)."""


@dataclass
class StepOutput:
    """One generated position.

    ``speech`` is (group_size frames, n_vq codebooks); all ``zero_speech_id`` unless ``has_speech``.
    ``in_speech``: the session is in speech mode after this position (True from the ``<|sosp|>``
    step on, False again from the ``<|eosp|>`` step). ``has_speech``: these frames are audio (the
    session was in speech mode and the text token is not ``<|eosp|>``).
    """

    text_id: int
    speech: torch.Tensor
    position: int
    in_speech: bool
    finish: str | None = None
    has_speech: bool = False
    text_logits: torch.Tensor | None = None  # (vocab,) float32, raw, when requested
    speech_logits: torch.Tensor | None = None  # (frames, n_vq, speech_vocab) float32, raw, speech steps only


class LMSession:
    """A conversation's place in the LM. Created by :meth:`SG2LM.open_session`."""

    def __init__(self, lm: SG2LM, slot: int, sampling: SamplingParams, seed: int) -> None:
        self._lm = lm
        self.slot = slot
        self.sampling = sampling
        self.seed = int(seed) & _SEED_MASK
        # Token the next step must emit on the text channel instead of sampling (consumed by it).
        self.force_next_text: int | None = None
        self._position = 0
        self._pending = False
        self._closed = False
        self._response_start: int | None = None
        self._response_cap: int | None = None

    @property
    def position(self) -> int:
        """Number of positions in the history (= index of the next position)."""
        return self._position

    @property
    def in_speech(self) -> bool:
        """Speech mode: more ``<|sosp|>`` than ``<|eosp|>`` so far."""
        self._lm._check_open(self)
        return self._lm._balance_before(self.slot, self._position) != 0

    @property
    def has_pending(self) -> bool:
        return self._pending

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def response_start(self) -> int | None:
        return self._response_start

    @property
    def response_positions(self) -> int:
        """Positions appended since :meth:`begin_response` (0 if no response is running)."""
        return 0 if self._response_start is None else self._position - self._response_start

    def begin_response(self, max_positions: int | None = None) -> None:
        """Mark the start of an agent reply; steps report ``finish="length"`` after ``max_positions``."""
        if max_positions is not None and max_positions < 1:
            raise ValueError("max_positions must be >= 1")
        self._response_start = self._position
        self._response_cap = max_positions

    def history(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Positions ``[start, end)`` of the history as a ``(4, 3 * n)`` matrix."""
        return self._lm._history_matrix(self, start, self._position if end is None else end)

    def text_ids(self, start: int = 0, end: int | None = None) -> list[int]:
        self._lm._check_open(self)
        end = self._position if end is None else end
        if not 0 <= start <= end <= self._position:
            raise ValueError(f"range [{start}, {end}) outside [0, {self._position})")
        return self._lm._text[self.slot, start:end].tolist()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"position={self._position} pending={self._pending}"
        return (
            f"LMSession(slot={self.slot}, {state}, in_speech={self.in_speech if not self._closed else '-'})"
        )


class StepProfiler:
    """Accumulates wall time per section of prefill/step when enabled (benchmarks); a no-op otherwise.

    On CUDA each section synchronises the device, so enable it only to measure.
    """

    def __init__(self, device: torch.device) -> None:
        self.enabled = False
        self.totals: dict[str, float] = defaultdict(float)
        self._cuda = device.type == "cuda"

    def reset(self) -> None:
        self.totals = defaultdict(float)

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if self._cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._cuda:
                torch.cuda.synchronize()
            self.totals[name] += time.perf_counter() - start


def _bucket(n: int, limit: int) -> int:
    b = 1
    while b < n:
        b *= 2
    return min(b, limit)


class SG2LM:
    """The loaded LM with its KV pool; see the module docstring for the decoding semantics.

    Not thread-safe: drive it from one scheduler loop.
    """

    def __init__(
        self,
        model: SG2Model,
        tokenizer: Any,
        special: SpecialTokens,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_sessions: int = 8,
        max_positions: int = 4096,
        attn_impl: str | None = None,
        prefill_chunk: int = 256,
        static_step: bool | None = None,
        cuda_graphs: bool | None = None,
        text_candidates: int = 1024,
    ) -> None:
        cfg = model.config
        self.model = model
        self.config: LMConfig = cfg
        self.tokenizer = tokenizer
        self.special = special
        self.device = torch.device(device)
        self.dtype = dtype
        if max_sessions < 1 or max_positions < 2:
            raise ValueError("need max_sessions >= 1 and max_positions >= 2")
        self.max_sessions = max_sessions
        self.max_positions = max_positions
        self.prefill_chunk = max(1, min(prefill_chunk, max_positions))
        self.text_candidates = text_candidates
        for name, tid in special.as_dict().items():
            if tid is not None and not 0 <= tid < cfg.vocab_size:
                raise TokenizerError(f"special token {name} has id {tid}, outside the model's vocabulary")
        on_cuda = self.device.type == "cuda"
        if attn_impl is None:
            attn_impl = (
                ("flash" if flash_available() and dtype != torch.float32 else "sdpa") if on_cuda else "eager"
            )
        if attn_impl not in ("eager", "sdpa", "flash"):
            raise ValueError(f"unknown attn_impl {attn_impl!r}")
        self.attn_impl = attn_impl
        self.static_step = on_cuda if static_step is None else static_step
        self.cuda_graphs = (on_cuda and self.static_step) if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and not (on_cuda and self.static_step):
            raise ValueError("cuda_graphs needs a CUDA device and static_step")

        with torch.no_grad():
            self._pool = KVPool(
                cfg.num_layers,
                max_sessions,
                max_positions,
                cfg.num_kv_heads,
                cfg.head_dim,
                dtype=dtype,
                device=self.device,
                layout="bthd" if attn_impl == "flash" else "bhtd",
            )
            cos, sin = rope_table(cfg.head_dim, cfg.rope_theta, max_positions + 1)
            self._cos, self._sin = cos.to(self.device, dtype), sin.to(self.device, dtype)
            lcos, lsin = rope_table(cfg.local_head_dim, cfg.rope_theta, cfg.group_size)
            self._lcos, self._lsin = lcos.to(self.device, dtype), lsin.to(self.device, dtype)
            self._pending_h = torch.zeros(max_sessions + 1, cfg.hidden_size, dtype=dtype, device=self.device)
            self._static_local = (
                LocalKV(
                    cfg.local_layers,
                    max_sessions + 1,
                    cfg.local_heads,
                    cfg.group_size,
                    cfg.local_head_dim,
                    dtype=dtype,
                    device=self.device,
                )
                if self.static_step
                else None
            )
        # Host-side history: text id, frames and running (<|sosp|> - <|eosp|>) count per position.
        s1, t = max_sessions + 1, max_positions
        self._text = np.zeros((s1, t), dtype=np.int64)
        self._speech = np.full((s1, t, cfg.group_size, cfg.n_vq), cfg.zero_speech_id, dtype=np.int16)
        self._balance = np.zeros((s1, t), dtype=np.int32)
        self._free = list(range(max_sessions))
        self._sessions: dict[int, LMSession] = {}
        self._row_params_cache: dict[tuple, RowParams] = {}
        self._graphs: _CudaGraphDecoder | None = _CudaGraphDecoder(self) if self.cuda_graphs else None
        self.prompt = PromptFormat(
            tokenizer, special, group_size=cfg.group_size, n_vq=cfg.n_vq, zero_speech_id=cfg.zero_speech_id
        )
        self.profiler = StepProfiler(self.device)

    # -- contract properties -------------------------------------------------------------------------
    @property
    def group_size(self) -> int:
        return self.config.group_size

    @property
    def n_vq(self) -> int:
        return self.config.n_vq

    @property
    def zero_speech_id(self) -> int:
        return self.config.zero_speech_id

    @property
    def sessions(self) -> list[LMSession]:
        return [self._sessions[s] for s in sorted(self._sessions)]

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def kv_cache_bytes(self) -> int:
        return self._pool.nbytes

    # -- sessions ------------------------------------------------------------------------------------
    def open_session(self, sampling: SamplingParams | None = None, seed: int | None = None) -> LMSession:
        """Take a free cache slot (the lowest); :class:`CapacityError` when all are in use."""
        if not self._free:
            raise CapacityError(f"all {self.max_sessions} LM session slots are in use")
        slot = self._free.pop(0)
        if seed is None:
            seed = secrets.randbits(62)  # leaves torch's global RNG untouched
        sess = LMSession(self, slot, sampling or SamplingParams(), seed)
        self._sessions[slot] = sess
        return sess

    def close_session(self, sess: LMSession) -> None:
        """Free the session's slot (its cache contents are simply overwritten by the next user)."""
        self._check_open(sess)
        sess._closed = True
        sess._pending = False
        del self._sessions[sess.slot]
        bisect.insort(self._free, sess.slot)

    def _check_open(self, sess: LMSession) -> None:
        if sess._lm is not self:
            raise LMStateError("session belongs to another LM")
        if sess._closed or self._sessions.get(sess.slot) is not sess:
            raise LMStateError("session is closed")

    # -- history bookkeeping -------------------------------------------------------------------------
    def _balance_before(self, slot: int, position: int) -> int:
        return 0 if position == 0 else int(self._balance[slot, position - 1])

    def _history_matrix(self, sess: LMSession, start: int, end: int) -> torch.Tensor:
        self._check_open(sess)
        if not 0 <= start <= end <= sess._position:
            raise ValueError(f"history range [{start}, {end}) outside [0, {sess._position})")
        g, q = self.group_size, self.n_vq
        n = end - start
        out = torch.full((1 + q, n * g), -100, dtype=torch.int64)
        out[0, ::g] = torch.from_numpy(self._text[sess.slot, start:end].copy())
        frames = torch.from_numpy(self._speech[sess.slot, start:end].astype(np.int64))  # (n, g, q)
        out[1:] = frames.reshape(n * g, q).t()
        return out

    def _record(self, slot: int, start: int, text: np.ndarray, speech: np.ndarray) -> None:
        n = text.shape[0]
        self._text[slot, start : start + n] = text
        self._speech[slot, start : start + n] = speech
        delta = (text == self.special.sosp).astype(np.int32) - (text == self.special.eosp).astype(np.int32)
        self._balance[slot, start : start + n] = self._balance_before(slot, start) + np.cumsum(delta)

    def rollback(self, sess: LMSession, position: int) -> None:
        """Keep positions ``[0, position)``. The pending state is invalid until the next ``prefill``."""
        self._check_open(sess)
        if not 0 <= position <= sess._position:
            raise ValueError(f"cannot roll back to {position}: history has {sess._position} positions")
        sess._position = position
        sess._pending = False
        if sess._response_start is not None and position < sess._response_start:
            sess._response_start = None
            sess._response_cap = None

    # -- matrices ------------------------------------------------------------------------------------
    def _split_matrix(self, matrix: Any) -> tuple[np.ndarray, np.ndarray]:
        """(4, 3n) matrix -> text (n,) and speech (n, group, n_vq), validated."""
        m = torch.as_tensor(matrix).detach().to("cpu", torch.int64)
        g, q = self.group_size, self.n_vq
        if m.dim() != 2 or m.shape[0] != 1 + q or m.shape[1] % g:
            raise ValueError(f"expected a ({1 + q}, {g}*positions) matrix, got {tuple(m.shape)}")
        n = m.shape[1] // g
        text = m[0, ::g].numpy()
        speech = m[1:].t().reshape(n, g, q).numpy()
        if n and (text.min() < 0 or text.max() >= self.config.vocab_size):
            raise ValueError(f"text ids must be in [0, {self.config.vocab_size})")
        if n and (speech.min() < 0 or speech.max() >= self.config.speech_vocab_size):
            raise ValueError(f"speech ids must be in [0, {self.config.speech_vocab_size})")
        return text.copy(), speech.astype(np.int16)

    # -- model pieces --------------------------------------------------------------------------------
    def _mask(self, qpos: torch.Tensor, kv_len: int) -> torch.Tensor:
        keys = torch.arange(kv_len, device=self.device)
        allowed = (keys[None, None, :] <= qpos[:, :, None])[:, None]  # (B,1,T,Tk)
        if self.attn_impl == "eager":
            bias = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
            return bias.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        return allowed

    def _backbone(
        self,
        x: torch.Tensor,
        qpos: torch.Tensor,
        write_slots: torch.Tensor,
        write_pos: torch.Tensor,
        read_rows: tuple[int, int] | torch.Tensor,
        kv_len: int,
        flash_decode: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run the backbone on x (B,T,hidden) at positions qpos (B,T), writing K/V to the pool."""
        cfg = self.config
        cos = self._cos[qpos].unsqueeze(2)
        sin = self._sin[qpos].unsqueeze(2)
        pool = self._pool
        if flash_decode is not None:
            from flash_attn import flash_attn_with_kvcache

            seqlens, batch_idx = flash_decode

            def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                out = flash_attn_with_kvcache(
                    q,
                    pool.k[layer],
                    pool.v[layer],
                    k=k,
                    v=v,
                    cache_seqlens=seqlens,
                    cache_batch_idx=batch_idx,
                    causal=True,
                )
                return out.reshape(q.shape[0], q.shape[1], -1)

            return self.model.model(x, cos, sin, attend)

        mask = self._mask(qpos, kv_len)
        ws, wp = write_slots.reshape(-1), write_pos.reshape(-1)
        attn = attention_eager if self.attn_impl == "eager" else attention_sdpa
        hkv, hd = cfg.num_kv_heads, cfg.head_dim

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            n = k.shape[0] * k.shape[1]
            pool.write(layer, ws, wp, k.reshape(n, hkv, hd), v.reshape(n, hkv, hd))
            keys, values = pool.read(layer, read_rows, kv_len)
            return attn(q, keys, values, mask)

        return self.model.model(x, cos, sin, attend)

    def _local(
        self,
        h_local: torch.Tensor,
        choose: Any,
        local_kv: LocalKV | None = None,
    ) -> list[torch.Tensor]:
        """Run the patch decoder's group_size steps from h_local (B, local_dim).

        ``choose(step, logits (B, n_vq, V)) -> codes (B, n_vq)`` picks each frame (sampling or
        teacher forcing). Returns the per-step logits.
        """
        cfg = self.config
        b = h_local.shape[0]
        kv = local_kv or LocalKV(
            cfg.local_layers,
            b,
            cfg.local_heads,
            cfg.group_size,
            cfg.local_head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        x = h_local[:, None, :]
        all_logits = []
        for step in range(cfg.group_size):
            cos = self._lcos[step].view(1, 1, 1, -1)
            sin = self._lsin[step].view(1, 1, 1, -1)

            def attend(
                layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: int = step
            ) -> torch.Tensor:
                kb, vb = kv.k[layer][:b], kv.v[layer][:b]
                kb[:, :, step] = k[:, 0]
                vb[:, :, step] = v[:, 0]
                return attention_eager(q, kb[:, :, : step + 1], vb[:, :, : step + 1], None)

            with self.profiler.section("patch_decoder"):
                out = self.model.local_transformer(x, cos, sin, attend)
                logits = self.model.speech_logits(out[:, 0]).float()  # (B, n_vq, V)
            all_logits.append(logits)
            with self.profiler.section("sampling"):
                codes = choose(step, logits)
            if step + 1 < cfg.group_size:
                with self.profiler.section("patch_decoder"):
                    x = self.model.speech_sum(codes)[:, None, :]
        return all_logits

    def _sample_speech(
        self,
        h_local: torch.Tensor,
        rp: RowParams,
        u: torch.Tensor,
        static: bool,
        local_kv: LocalKV | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Sample (B, group, n_vq) frames; u (B, group * n_vq) uniforms."""
        b, q = h_local.shape[0], self.n_vq
        rq = rp.repeat(q)
        frames: list[torch.Tensor] = []

        def choose(step: int, logits: torch.Tensor) -> torch.Tensor:
            flat = logits.reshape(b * q, -1)
            us = u[:, step * q : (step + 1) * q].reshape(-1)
            codes = sample_rows(
                flat, rq, us, exclude=self.zero_speech_id, candidates=flat.shape[-1], static=static
            )
            codes = codes.view(b, q)
            frames.append(codes)
            return codes

        logits = self._local(h_local, choose, local_kv)
        return torch.stack(frames, dim=1), logits

    def _row_params(self, sessions: list[LMSession]) -> RowParams:
        key = tuple(s.sampling for s in sessions)
        rp = self._row_params_cache.get(key)
        if rp is None:
            if len(self._row_params_cache) > 64:
                self._row_params_cache.clear()
            rp = RowParams.build(list(key), self.device)
            self._row_params_cache[key] = rp
        return rp

    # -- prefill -------------------------------------------------------------------------------------
    def prefill(
        self, sess: LMSession, matrix: Any, *, return_text_logits: bool = False
    ) -> torch.Tensor | None:
        """Append the positions of ``matrix`` (4, 3n) to the session's history (chunked internally).

        Afterwards the pending state is the last appended position's. With ``return_text_logits``
        the text-head logits (n, vocab) at every appended position are returned (for tests).
        """
        out = self.prefill_many([(sess, matrix)], return_text_logits=return_text_logits)
        return out[0] if return_text_logits else None

    def prefill_many(
        self, items: list[tuple[LMSession, Any]], *, return_text_logits: bool = False
    ) -> list[torch.Tensor] | None:
        """Prefill several sessions' chunks in shared batched forwards (padded to the longest chunk)."""
        with torch.no_grad():
            return self._prefill_many(items, return_text_logits)

    def _prefill_many(
        self, items: list[tuple[LMSession, Any]], return_logits: bool
    ) -> list[torch.Tensor] | None:
        seen = set()
        parsed = []
        for sess, matrix in items:
            self._check_open(sess)
            if sess.slot in seen:
                raise ValueError("a session appears twice in one prefill_many call")
            seen.add(sess.slot)
            text, speech = self._split_matrix(matrix)
            if sess._position + text.shape[0] > self.max_positions:
                raise CapacityError(
                    f"session slot {sess.slot}: {sess._position} + {text.shape[0]} positions exceed "
                    f"max_positions={self.max_positions}"
                )
            parsed.append((sess, text, speech))
        logits_out: list[list[torch.Tensor]] = [[] for _ in parsed]
        work = [(i, s, t, sp) for i, (s, t, sp) in enumerate(parsed) if t.shape[0] > 0]
        offset = [0] * len(parsed)
        cfg = self.config
        dev = self.device
        while True:
            rows = [(i, s, t, sp) for i, s, t, sp in work if offset[i] < t.shape[0]]
            if not rows:
                break
            lens = [min(self.prefill_chunk, t.shape[0] - offset[i]) for i, _, t, _ in rows]
            b, tmax = len(rows), max(lens)
            text = np.zeros((b, tmax), dtype=np.int64)
            speech = np.full((b, tmax, cfg.group_size, cfg.n_vq), cfg.zero_speech_id, dtype=np.int64)
            qpos = np.zeros((b, tmax), dtype=np.int64)
            wslot = np.full((b, tmax), self._pool.scratch_slot, dtype=np.int64)
            wpos = np.tile(np.arange(tmax, dtype=np.int64), (b, 1))
            for r, ((i, s, t, sp), n) in enumerate(zip(rows, lens, strict=True)):
                start = s._position + offset[i]
                text[r, :n] = t[offset[i] : offset[i] + n]
                speech[r, :n] = sp[offset[i] : offset[i] + n]
                qpos[r, :n] = np.arange(start, start + n)
                qpos[r, n:] = start + n - 1
                wslot[r, :n] = s.slot
                wpos[r, :n] = qpos[r, :n]
            slots = [s.slot for _, s, _, _ in rows]
            kv_len = int(qpos.max()) + 1
            read_rows = self._read_rows(slots)
            x = self.model.embed_positions(torch.from_numpy(text).to(dev), torch.from_numpy(speech).to(dev))
            hidden = self._backbone(
                x,
                torch.from_numpy(qpos).to(dev),
                torch.from_numpy(wslot).to(dev),
                torch.from_numpy(wpos).to(dev),
                read_rows,
                kv_len,
            )
            last = torch.tensor([n - 1 for n in lens], device=dev)
            slot_t = torch.tensor(slots, device=dev)
            self._pending_h[slot_t] = hidden[torch.arange(b, device=dev), last]
            for r, ((i, _, _, _), n) in enumerate(zip(rows, lens, strict=True)):
                if return_logits:
                    logits_out[i].append(self.model.text_logits(hidden[r, :n]).float().cpu())
                offset[i] += n
        for sess, text, speech in parsed:
            n = text.shape[0]
            if n == 0:
                continue
            self._record(sess.slot, sess._position, text, speech)
            sess._position += n
            sess._pending = True
        if not return_logits:
            return None
        vocab = cfg.vocab_size
        return [torch.cat(parts) if parts else torch.zeros(0, vocab) for parts in logits_out]

    def _read_rows(self, slots: list[int]) -> tuple[int, int] | torch.Tensor:
        """A (start, stop) range when the slots are consecutive ascending (a view), else an index tensor."""
        if all(b == a + 1 for a, b in itertools.pairwise(slots)):
            return (slots[0], slots[-1] + 1)
        return torch.tensor(slots, device=self.device)

    # -- decode --------------------------------------------------------------------------------------
    def step(self, sessions: list[LMSession], *, return_logits: bool = False) -> list[StepOutput]:
        """Generate one position for each session in one batched forward (sessions may be at any lengths)."""
        if not sessions:
            return []
        seen = set()
        for s in sessions:
            self._check_open(s)
            if s.slot in seen:
                raise ValueError("a session appears twice in one step")
            seen.add(s.slot)
            if not s._pending:
                raise LMStateError(
                    f"session slot {s.slot} has no pending state (prefill after open/rollback before stepping)"
                )
            if s._position >= self.max_positions:
                raise CapacityError(f"session slot {s.slot} is full ({self.max_positions} positions)")
        with torch.no_grad():
            if self.static_step:
                tokens, tlog, slog = self._step_static(sessions, return_logits)
            else:
                tokens, tlog, slog = self._step_eager(sessions, return_logits)
        return self._finish_step(sessions, tokens, tlog, slog)

    def _speech_rows(self, sessions: list[LMSession]) -> list[int]:
        return [i for i, s in enumerate(sessions) if self._balance_before(s.slot, s._position) != 0]

    def _forced(self, sessions: list[LMSession]) -> list[tuple[int, int]]:
        forced = []
        for i, s in enumerate(sessions):
            if s.force_next_text is not None:
                tid = int(s.force_next_text)
                if not 0 <= tid < self.config.vocab_size:
                    raise ValueError(f"force_next_text={tid} is outside the vocabulary")
                forced.append((i, tid))
        return forced

    def _step_eager(
        self, sessions: list[LMSession], return_logits: bool
    ) -> tuple[np.ndarray, torch.Tensor | None, dict[int, torch.Tensor]]:
        cfg = self.config
        dev = self.device
        b = len(sessions)
        slots_l = [s.slot for s in sessions]
        pos_l = [s._position for s in sessions]
        slots = torch.tensor(slots_l, device=dev)
        positions = torch.tensor(pos_l, device=dev)
        seeds = torch.tensor([s.seed for s in sessions], device=dev)
        prof = self.profiler
        rp = self._row_params(sessions)
        h = self._pending_h.index_select(0, slots)
        with prof.section("text_head"):
            text_logits = self.model.text_logits(h).float()
        with prof.section("sampling"):
            u = counter_uniforms(seeds, positions, 1 + cfg.group_size * cfg.n_vq)
            text = sample_rows(text_logits, rp, u[:, 0], candidates=self.text_candidates)
            forced = self._forced(sessions)
            if forced:
                idx = torch.tensor([i for i, _ in forced], device=dev)
                text[idx] = torch.tensor([t for _, t in forced], device=dev)
        speech = torch.full((b, cfg.group_size, cfg.n_vq), cfg.zero_speech_id, dtype=torch.int64, device=dev)
        speech_logits: dict[int, torch.Tensor] = {}
        rows = self._speech_rows(sessions)
        if rows:
            idx = torch.tensor(rows, device=dev)
            with prof.section("patch_decoder"):
                hl = self.model.downcast(h.index_select(0, idx))
            frames, logits = self._sample_speech(
                hl, rp.select(idx), u.index_select(0, idx)[:, 1:], static=False
            )
            keep = (text.index_select(0, idx) != self.special.eosp)[:, None, None]
            speech[idx] = torch.where(keep, frames, torch.full_like(frames, cfg.zero_speech_id))
            if return_logits:
                stacked = torch.stack(logits, dim=1).cpu()  # (b', group, n_vq, V)
                speech_logits = {r: stacked[j] for j, r in enumerate(rows)}
        flash = None
        if self.attn_impl == "flash":
            flash = (positions.to(torch.int32), slots.to(torch.int32))
        with prof.section("backbone"):
            x = self.model.embed_positions(text[:, None], speech[:, None])
            hidden = self._backbone(
                x,
                positions[:, None],
                slots[:, None],
                positions[:, None],
                self._read_rows(slots_l),
                max(pos_l) + 1,
                flash,
            )
            self._pending_h[slots] = hidden[:, 0]
        tokens = torch.cat([text[:, None], speech.reshape(b, -1)], dim=1).cpu().numpy()
        return tokens, (text_logits.cpu() if return_logits else None), speech_logits

    def _static_inputs(self, sessions: list[LMSession]) -> tuple[int, dict[str, torch.Tensor]]:
        """Host-built inputs of the fixed-shape step: row r is slot r for r < n (a bucket size)."""
        n = _bucket(max(s.slot for s in sessions) + 1, self.max_sessions)
        positions = np.full(n, self._pool.scratch_position, dtype=np.int64)
        active = np.zeros(n, dtype=bool)
        speech_mask = np.zeros(n, dtype=bool)
        force = np.full(n, -1, dtype=np.int64)
        temperature = np.ones(n, dtype=np.float32)
        top_k = np.zeros(n, dtype=np.int64)
        top_p = np.ones(n, dtype=np.float32)
        greedy = np.ones(n, dtype=bool)
        seeds = np.zeros(n, dtype=np.int64)
        for r, tid in self._forced(sessions):
            force[sessions[r].slot] = tid
        for s in sessions:
            r = s.slot
            positions[r] = s._position
            active[r] = True
            speech_mask[r] = self._balance_before(s.slot, s._position) != 0
            p = s.sampling
            greedy[r] = p.greedy
            if not p.greedy:
                temperature[r], top_k[r], top_p[r] = p.temperature, p.top_k, p.top_p
            seeds[r] = s.seed
        arrays = dict(
            positions=positions,
            active=active,
            speech_mask=speech_mask,
            force=force,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            greedy=greedy,
            seeds=seeds,
        )
        return n, {k: torch.from_numpy(v) for k, v in arrays.items()}

    def _step_static(
        self, sessions: list[LMSession], return_logits: bool
    ) -> tuple[np.ndarray, torch.Tensor | None, dict[int, torch.Tensor]]:
        n, inputs = self._static_inputs(sessions)
        if self._graphs is not None and not return_logits:
            out = self._graphs.run(n, inputs)
            text_logits, local_logits = None, None
        else:
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            out, text_logits, local_logits = self._static_decode(n, inputs)
        rows = [s.slot for s in sessions]
        tokens = out.cpu().numpy()[rows]
        tlog = text_logits.cpu()[rows] if return_logits and text_logits is not None else None
        slog: dict[int, torch.Tensor] = {}
        if return_logits and local_logits is not None:
            stacked = torch.stack(local_logits, dim=1).cpu()
            slog = {i: stacked[s.slot] for i, s in enumerate(sessions) if inputs["speech_mask"][s.slot]}
        return tokens, tlog, slog

    def _static_decode(
        self, n: int, inp: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """The fixed-shape decode step over slots [0, n): no host synchronisation, no data-dependent
        shapes, so it can be captured in a CUDA graph. Inactive rows compute garbage that is written
        only to the scratch position and discarded."""
        cfg = self.config
        dev = self.device
        rows = torch.arange(n, device=dev)
        rp = RowParams(
            temperature=inp["temperature"],
            top_k=inp["top_k"],
            top_p=inp["top_p"],
            greedy=inp["greedy"],
            max_top_k=0,
            any_filter=True,
            any_unfiltered=True,
            all_greedy=False,
        )
        positions = inp["positions"]
        u = counter_uniforms(inp["seeds"], positions, 1 + cfg.group_size * cfg.n_vq)
        h = self._pending_h[:n]
        text_logits = self.model.text_logits(h).float()
        text = sample_rows(text_logits, rp, u[:, 0], candidates=cfg.vocab_size, static=True)
        text = torch.where(inp["force"] >= 0, inp["force"], text)
        hl = self.model.downcast(h)
        frames, local_logits = self._sample_speech(hl, rp, u[:, 1:], static=True, local_kv=self._static_local)
        keep = (inp["speech_mask"] & (text != self.special.eosp))[:, None, None]
        speech = torch.where(keep, frames, torch.full_like(frames, cfg.zero_speech_id))
        x = self.model.embed_positions(text[:, None], speech[:, None])
        flash = (positions.to(torch.int32), rows.to(torch.int32)) if self.attn_impl == "flash" else None
        hidden = self._backbone(
            x, positions[:, None], rows[:, None], positions[:, None], (0, n), self.max_positions + 1, flash
        )
        self._pending_h[:n] = torch.where(inp["active"][:, None], hidden[:, 0], h)
        out = torch.cat([text[:, None], speech.reshape(n, -1)], dim=1)
        return out, text_logits, local_logits

    def _finish_step(
        self,
        sessions: list[LMSession],
        tokens: np.ndarray,
        text_logits: torch.Tensor | None,
        speech_logits: dict[int, torch.Tensor],
    ) -> list[StepOutput]:
        cfg = self.config
        g, q = cfg.group_size, cfg.n_vq
        sp = self.special
        outputs = []
        for i, s in enumerate(sessions):
            row = tokens[i]
            tid = int(row[0])
            frames = row[1:].reshape(g, q)
            was_speech = self._balance_before(s.slot, s._position) != 0
            pos = s._position
            self._record(s.slot, pos, row[:1].astype(np.int64), frames[None].astype(np.int16))
            s._position = pos + 1
            s._pending = True
            s.force_next_text = None
            finish = None
            if tid == sp.eos:
                finish = FINISH_EOS
            elif (s._response_cap is not None and s.response_positions >= s._response_cap) or (
                s._position >= self.max_positions
            ):
                finish = FINISH_LENGTH
            outputs.append(
                StepOutput(
                    text_id=tid,
                    speech=torch.from_numpy(frames.astype(np.int64)),
                    position=pos,
                    in_speech=bool(self._balance[s.slot, pos] != 0),
                    finish=finish,
                    has_speech=was_speech and tid != sp.eosp,
                    text_logits=None if text_logits is None else text_logits[i],
                    speech_logits=speech_logits.get(i),
                )
            )
        return outputs

    # -- inspection (tests, debugging) ---------------------------------------------------------------
    def pending_hidden(self, sess: LMSession) -> torch.Tensor:
        """The backbone's (final-norm) output at the last position, which the next step samples from."""
        self._check_open(sess)
        if not sess._pending:
            raise LMStateError("session has no pending state")
        return self._pending_h[sess.slot].clone()

    def patch_logits(self, sess: LMSession, frames: Any) -> torch.Tensor:
        """Teacher-forced patch-decoder logits (group, n_vq, speech_vocab) from the pending state,
        feeding ``frames`` (at least group_size - 1 frames of n_vq codes) as the previous frames."""
        h = self.pending_hidden(sess)
        f = torch.as_tensor(frames, dtype=torch.int64, device=self.device).reshape(-1, self.n_vq)
        if f.shape[0] < self.group_size - 1:
            raise ValueError(f"need {self.group_size - 1} frames to feed")
        with torch.no_grad():
            hl = self.model.downcast(h[None])
            logits = self._local(hl, lambda step, _logits: f[step][None] if step < f.shape[0] else None)
        return torch.stack([x[0] for x in logits]).cpu()


class _CudaGraphDecoder:
    """CUDA-graph replay of :meth:`SG2LM._static_decode`, one graph per batch bucket.

    Written for, but not yet verified on, a GPU (this project's CI machines have none).
    """

    def __init__(self, lm: SG2LM) -> None:
        self.lm = lm
        self.graphs: dict[int, Any] = {}
        self.inputs: dict[int, dict[str, torch.Tensor]] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None

    def run(self, n: int, host_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if n not in self.graphs:
            self._capture(n, host_inputs)
        buf = self.inputs[n]
        for k, v in host_inputs.items():
            buf[k].copy_(v, non_blocking=True)
        self.graphs[n].replay()
        return self.outputs[n]

    def _capture(self, n: int, host_inputs: dict[str, torch.Tensor]) -> None:
        lm = self.lm
        dev = lm.device
        # Static inputs: all rows inactive, so warm-up and capture touch only scratch positions.
        buf = {k: v.to(dev).clone() for k, v in host_inputs.items()}
        buf["active"].zero_()
        buf["positions"].fill_(lm._pool.scratch_position)
        saved = lm._pending_h.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                lm._static_decode(n, buf)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out, _, _ = lm._static_decode(n, buf)
        self.pool = graph.pool()
        lm._pending_h.copy_(saved)
        self.graphs[n] = graph
        self.inputs[n] = buf
        self.outputs[n] = out


def _default_dtype(device: torch.device, config: LMConfig) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32
    if config.torch_dtype == "float16" or not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def load_lm(
    model_dir: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    max_sessions: int = 8,
    max_positions: int = 4096,
    *,
    progress: bool | None = None,
    **options: Any,
) -> SG2LM:
    """Load tokenizer, config and weights from an unchanged checkpoint directory and preallocate the
    KV pool. ``dtype`` defaults to float32 on CPU and bfloat16 (float16 if unsupported) on CUDA.
    ``options`` go to :class:`SG2LM` (attn_impl, prefill_chunk, static_step, cuda_graphs, ...)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise LMCheckpointError(f"{model_dir} is not a directory")
    device = torch.device(device)
    tokenizer = load_tokenizer(model_dir)
    special = resolve_special_tokens(tokenizer)
    config = LMConfig.from_dir(model_dir)
    dtype = dtype or _default_dtype(device, config)
    model = load_weights(model_dir, config, device=device, dtype=dtype, progress=progress)
    return SG2LM(
        model,
        tokenizer,
        special,
        device=device,
        dtype=dtype,
        max_sessions=max_sessions,
        max_positions=max_positions,
        **options,
    )
