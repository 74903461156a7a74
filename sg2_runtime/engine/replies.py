"""Agent replies: starting and releasing them, generated positions, decoded chunks, playback-bound
pacing, barge-in cuts and exact truncation. A mixin of :class:`Conversation` (it works on the
conversation's state; see conversation.py for the invariants)."""

from __future__ import annotations

import numpy as np
import torch

from . import events as ev
from .base import FRAME_MS, GROUP, new_id
from .playback import PlaybackClock
from .response import CHUNK_MS, Response


class Replies:
    """Reply half of :class:`~sg2_runtime.engine.conversation.Conversation`."""

    def truncate_reply(self, response_id: str, audio_ms: int) -> None:
        """The listener heard exactly ``audio_ms`` of reply ``response_id``: cut its turn to that.

        Works on the reply in progress (it stops, as on a barge-in) and on the latest finished one,
        even after the next user turn has begun (the history after it is shifted and the LM cache
        re-prefilled from the cut). History keeps whole 120 ms positions: ``audio_ms // 120`` of
        them. A reply can only get shorter; the greeting (part of the prompt head) is only stopped.
        Ends with ``HistoryTruncated(response_id, kept_ms)``.
        """
        keep_chunks = max(0, int(audio_ms)) // CHUNK_MS
        resp = self.response
        if resp is not None and resp.id == response_id and resp.released:
            if resp.greeting:
                self._cut_response(status="cancelled", announce_truncation=False)
                self.emit(ev.HistoryTruncated(resp.id, min(int(audio_ms), resp.generated_ms)))
                return
            if resp.generating or keep_chunks < len(resp.audio_positions):
                resp.clock.set_played(keep_chunks * CHUNK_MS)
                self._cut_response(status="cancelled", announce_truncation=False)
                self._promote_barge_in()
                kept = resp.kept_chunks or 0
            else:
                resp.clock.set_played(resp.clock.emitted_ms)  # all of it was heard
                kept = len(resp.audio_positions)
            self.emit(ev.HistoryTruncated(resp.id, kept * CHUNK_MS))
            return
        rec = self._last_reply
        if rec is None or rec.id != response_id:
            raise ValueError(f"cannot truncate {response_id}: only the latest reply can be truncated")
        if rec.span is None or not any(t is rec.span for t in self.history.turns):
            raise ValueError(f"cannot truncate {response_id}: it left the history (context limit)")
        kept = len(rec.audio_positions) if rec.kept_chunks is None else rec.kept_chunks
        if keep_chunks < kept:
            self._recut(rec, keep_chunks)
        self.emit(ev.HistoryTruncated(rec.id, min(keep_chunks, kept) * CHUNK_MS))

    def _recut(self, rec: Response, keep_chunks: int) -> None:
        """Re-cut a finished reply's turn to its first ``keep_chunks`` chunks, shifting what follows."""
        span = rec.span
        assert span is not None and span.end is not None
        old_end = span.end
        keep = rec.audio_positions[keep_chunks - 1] + 1 if keep_chunks else rec.start_pos + rec.head_len
        ids = self.history.text_ids(rec.start_pos, keep).tolist()
        closing = self.fmt.agent_close(ids.count(self.fmt.sosp) > ids.count(self.fmt.eosp))
        delta = self.history.replace(keep, old_end, closing)
        if keep < self.cache_len:
            self._lm_rollback(keep)
            self.cache_len = keep
        if self.cache_len < self.history.length:
            self.pending_ok = False
        rec.kept_chunks = keep_chunks
        turn = self.turn
        if turn is not None:
            for name in ("open_pos", "groups_pos", "spec_pos", "filler_pos"):
                value = getattr(turn, name)
                if value is not None and value >= old_end:
                    setattr(turn, name, value + delta)
        resp = self.response
        if resp is not None and not resp.greeting and resp.start_pos >= old_end:
            resp.start_pos += delta
            resp.audio_positions = [p + delta for p in resp.audio_positions]

    # ------------------------------------------------------------------ replies
    def _new_response(
        self, turn_id: str | None, greeting: bool = False, response_id: str | None = None
    ) -> Response:
        clock = PlaybackClock(self.opts.flow_control, self._now)
        return Response(
            response_id or new_id("greet" if greeting else "resp"),
            turn_id,
            clock,
            greeting=greeting,
            max_positions=self._max_response_positions,
        )

    def _start_reply(
        self,
        turn_id: str | None,
        released: bool,
        endpoint_ms: float | None = None,
        *,
        response_id: str | None = None,
        agent_prefix: bool = False,
    ) -> None:
        """Open the agent's turn. ``agent_prefix``: the history does not end with a user turn (whose
        suffix already opens the agent's turn), so the reply needs its own ``[|SpeechGPT|]: ``."""
        if self.response is not None:
            self._stop_agent_for_new_turn(status="cancelled")
        self._awaiting_reply = False
        resp = self._new_response(turn_id, response_id=response_id)
        self.history.open_turn("agent")
        resp.span = self.history.turns[-1]
        if agent_prefix:
            self.history.append(self.fmt.agent_open())
        resp.start_pos = self.history.length
        if self.opts.force_speech_reply:
            self.history.append(self.fmt.reply_open())
            resp.head_len = 1
        resp.prefill_started = self._now()
        self.response = resp
        self.decoder_needs_reset = True
        if released:
            self._release(resp, endpoint_ms)

    def _release(self, resp: Response, endpoint_ms: float | None) -> None:
        resp.released = True
        resp.commit_time = self._now()
        resp.commit_step = self.steps_done
        resp.endpoint_ms = endpoint_ms
        self.emit(ev.ResponseStarted(resp.id, resp.turn_id, context_positions=resp.start_pos))
        while resp.held:
            event = resp.held.popleft()
            if isinstance(event, ev.AudioChunk):
                self._emit_chunk(resp, event)
            else:
                self.emit(event)  # type: ignore[arg-type]
        self.detector.agent_speaking = True
        self._maybe_finish(resp)

    def wants_step(self) -> bool:
        resp = self.response
        return (
            resp is not None
            and resp.generating
            and not resp.greeting
            and self.pending_ok
            and self.cache_len == self.history.length
            and resp.within_margin(self.opts.output_margin_ms)
            and len(resp.to_decode) < 4
        )

    def on_step(self, text_id: int, speech: torch.Tensor, finish: str | None, step_ms: float) -> None:
        """One generated position: (text id, (3 frames, 3) speech tokens)."""
        resp = self.response
        assert resp is not None
        self.steps_done += 1
        now = self._now()
        resp.last_step_at = now
        if resp.first_step_ms is None:
            resp.first_step_ms = step_ms
            resp.first_step_at = now
            if resp.prefill_started is not None:
                resp.prefill_ms = max(0.0, (self._now() - resp.prefill_started) * 1000 - step_ms)
        pos = self.history.length
        column = torch.full((4, GROUP), -100, dtype=torch.long)
        column[0, 0] = text_id
        column[1:, :] = speech.T
        self.history.append(column)
        self.cache_len = self.history.length
        resp.generated_positions += 1
        resp.text_ids.append(text_id)
        if bool((speech != self.fmt.zero_id).all()):
            resp.audio_positions.append(pos)
            resp.to_decode.append(speech)
        self._emit_text_delta(resp)
        if finish is None and resp.generated_positions >= resp.max_positions:
            finish = "length"
        if finish is not None:
            self._end_generation(resp, "completed" if finish == "eos" else "length")

    def _end_generation(self, resp: Response, status: str) -> None:
        resp.generating = False
        resp.status = status
        if status == "length":
            in_speech = self._in_speech(resp)
            self.history.append(self.fmt.agent_close(in_speech))
        self.history.close_turn()
        self._maybe_finish(resp)

    def _in_speech(self, resp: Response) -> bool:
        ids = self.history.text_ids(resp.start_pos).tolist()
        return ids.count(self.fmt.sosp) > ids.count(self.fmt.eosp)

    def _emit_text_delta(self, resp: Response) -> None:
        text = self.fmt.decode_text(resp.text_ids)
        if text.endswith("\ufffd") or not text.startswith(resp.text_emitted):
            return
        delta = text[len(resp.text_emitted) :]
        if delta:
            resp.text_emitted = text
            event = ev.TextDelta(resp.id, delta)
            if resp.released:
                self.emit(event)
            else:
                resp.held.append(event)

    # ------------------------------------------------------------------ codec decode
    def next_decode(self) -> tuple[torch.Tensor, bool] | None:
        """(speech tokens (3 frames, 3), reset decoder first?) for the next chunk, if allowed now."""
        resp = self.response
        if resp is None or not resp.to_decode:
            return None
        if resp.greeting and resp.decoded * CHUNK_MS - resp.clock.played_ms() >= self.opts.output_margin_ms:
            return None  # the greeting is paced like a reply: at most a margin ahead of playback
        reset = self.decoder_needs_reset
        self.decoder_needs_reset = False
        return resp.to_decode.popleft(), reset

    def on_decoded(self, pcm: np.ndarray) -> None:
        resp = self.response
        assert resp is not None
        index = resp.decoded
        resp.decoded += 1
        chunk = ev.AudioChunk(resp.id, index, index * CHUNK_MS, pcm)
        if resp.released:
            self._emit_chunk(resp, chunk)
        else:
            resp.held.append(chunk)
        self._maybe_finish(resp)

    def _emit_chunk(self, resp: Response, chunk: ev.AudioChunk) -> None:
        resp.clock.on_emitted(chunk.duration_ms)
        resp.emitted_chunks += 1
        self.emit(chunk)
        if not resp.metrics_sent and not resp.greeting and resp.commit_time is not None:
            resp.metrics_sent = True
            self.emit(
                ev.Metrics(
                    resp.id,
                    endpointing_ms=resp.endpoint_ms,
                    prefill_ms=resp.prefill_ms,
                    first_step_ms=resp.first_step_ms or 0.0,
                    commit_to_first_audio_ms=(self._now() - resp.commit_time) * 1000,
                    speculative_hit=resp.speculative,
                    steps_after_commit=self.steps_done - (resp.commit_step or 0),
                )
            )

    def _maybe_finish(self, resp: Response) -> None:
        if resp.done_sent or resp.generating or not resp.released:
            return
        if resp.decoded < len(resp.audio_positions):
            return
        resp.done_sent = True
        status = resp.status or "completed"
        self.emit(
            ev.ResponseDone(
                resp.id,
                status,  # type: ignore[arg-type]
                resp.generated_ms,
                resp.clock.played_ms(),
                resp.text_emitted,
                realtime_factor=resp.realtime_factor(),
                generated_positions=resp.generated_positions,
            )
        )

    # ------------------------------------------------------------------ barge-in and cuts
    def _cut_response(self, status: str, announce_truncation: bool = True) -> None:
        """Stop the reply and keep in history exactly the chunks that were played."""
        resp = self.response
        assert resp is not None
        played_ms = resp.clock.played_ms() if resp.released else 0
        played_chunks = min(played_ms // CHUNK_MS, len(resp.audio_positions))
        self.response = None
        self.detector.agent_speaking = False
        if resp.greeting:  # its audio stops; the prompt keeps the whole greeting (the voice prompt)
            resp.generating = False
            if not resp.done_sent:
                resp.done_sent = True
                self.emit(ev.ResponseDone(resp.id, status, resp.generated_ms, played_ms, resp.text_emitted))  # type: ignore[arg-type]
            elif announce_truncation:
                self.emit(ev.HistoryTruncated(resp.id, played_ms))  # fully sent already: drop what is queued
            return
        keep = (
            resp.audio_positions[played_chunks - 1] + 1 if played_chunks else resp.start_pos + resp.head_len
        )
        keep = min(keep, self.history.length)
        self._truncate(keep)
        kept_ids = self.history.text_ids(resp.start_pos).tolist()
        in_speech = kept_ids.count(self.fmt.sosp) > kept_ids.count(self.fmt.eosp)
        if self.history.turns and self.history.turns[-1].role == "agent":
            self.history.turns[-1].end = None
        self.history.append(self.fmt.agent_close(in_speech))
        self.history.close_turn()
        text = self.fmt.decode_text(kept_ids)
        if resp.done_sent:
            if announce_truncation:
                self.emit(ev.HistoryTruncated(resp.id, played_chunks * CHUNK_MS))
        elif resp.released:
            resp.done_sent = True
            self.emit(
                ev.ResponseDone(
                    resp.id,
                    status,  # type: ignore[arg-type]
                    resp.generated_ms,
                    played_chunks * CHUNK_MS,
                    text,
                    generated_positions=resp.generated_positions,
                )
            )
        resp.generating = False
        resp.kept_chunks = played_chunks
        if resp.released:
            self._last_reply = resp
        self.decoder_needs_reset = True

    def _end_reply(self) -> None:
        """The current reply (fully generated) is over: the agent's turn ends as it stands."""
        resp = self.response
        assert resp is not None
        self.response = None
        self.detector.agent_speaking = False
        self.decoder_needs_reset = True
        if not resp.greeting:
            self._last_reply = resp

    def _stop_agent_for_new_turn(self, status: str) -> None:
        if self.response is not None:
            self._cut_response(status)

    def poll(self) -> None:
        """Time-based housekeeping: a fully played reply ends the agent's turn."""
        resp = self.response
        if resp is None or not resp.released or resp.generating or resp.clock.paused:
            return
        if resp.fully_played() and resp.done_sent:
            self._end_reply()
            self._maybe_trim_history()
            if not self.vad_enabled and self.frames_encoded > self._last_turn_end_frame:
                self._open_audio_turn(self._last_turn_end_frame, self._last_turn_end_frame * FRAME_MS)
