"""One call's conversation state on the engine thread: input framing, turn-taking, barge-in,
history, and the reply being generated. No model code: the engine batches the work this object
asks for (encode a frame, run VAD on a window, prefill history, step the LM, decode a chunk) across
every live call and hands the results back.

Invariants:
- ``history`` is the truth; the LM cache holds ``history[:cache_len]`` and is rolled back (through
  ``lm_rollback``) whenever the tail it covers is rewritten.
- A reply's audio and text leave the engine only once the user's turn is committed; a
  speculative reply started during the silence is rolled back if the user goes on talking.
- A barge-in cuts the reply's turn in history to the chunks the listener heard; a transport that
  knows exactly what was heard (``truncate_reply``) can re-cut the latest reply to that, even after
  the next user turn has begun.
- With ``auto_reply`` off a committed user turn waits for ``create_response``; if another user turn
  comes first, the agent's turn in between is recorded as an empty reply (the format needs one).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from . import events as ev
from .audio_input import NormalisedAudio
from .history import History
from .options import SessionOptions
from .playback import PlaybackClock
from .response import CHUNK_MS, Response
from .turn_format import TurnFormat
from .turns import Signal, TurnDetector, TurnSignal
from .vad import WINDOW

FRAME = 960  # codec samples per frame (40 ms at 24 kHz)
FRAME_MS = 40
GROUP = 3

_ids = itertools.count(1)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{next(_ids):06d}"


class SessionFailure(RuntimeError):
    """Something went wrong for this call only; the engine ends it with an error event."""


@dataclass
class UserTurn:
    id: str
    kind: str  # "audio" | "text"
    start_frame: int
    open_pos: int  # history position of "[|Human|]: "
    groups_pos: int  # history position of the first speech group
    start_ms: int
    groups: int = 0  # complete 3-frame groups appended to history
    end_frame: int | None = None  # cut chosen at speculation/commit
    spec_pos: int | None = None  # history length before a speculative tail
    committed: bool = False
    filler_pos: int | None = None  # where the empty agent turn before this one starts (auto_reply off)


class Conversation:
    def __init__(
        self,
        *,
        session_id: str,
        slot: int,
        options: SessionOptions,
        fmt: TurnFormat,
        capacity: int,
        greeting: object | None,
        greeting_frames: torch.Tensor | None,
        emit: Callable[[ev.Event], None],
        lm_rollback: Callable[[int], None],
        high_water: float = 0.85,
        now: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.id = session_id
        self.slot = slot
        self.opts = options
        self.fmt = fmt
        self.emit_event = emit
        self._lm_rollback = lm_rollback
        self._now = now
        self.history = History(capacity)
        self.cache_len = 0
        self.pending_ok = False
        self.detector = TurnDetector(options.turn_detection)
        self.vad_enabled = options.turn_detection.enabled
        # input framing
        self._pcm24 = SampleQueue()
        self._pcm16 = SampleQueue()
        self.frames: list[np.ndarray] = []  # codec tokens (3,) per frame, absolute index = _frame_base + i
        self._frame_base = 0
        self.frames_encoded = 0
        self.vad_windows = 0
        self.input_ms = 0.0
        # turn-taking
        self.turn: UserTurn | None = None
        self.response: Response | None = None
        self.closed = False
        self.lm_session: object | None = None  # set by the engine; for inspection only
        self.stats = {"speculations": 0, "speculation_rollbacks": 0, "speculative_hits": 0, "trims": 0}
        self.decoder_needs_reset = True
        self.steps_done = 0  # LM steps taken by this session (for latency accounting)
        self._candidate_start_frame: int | None = None  # barge-in: where the interrupting turn starts
        self._last_turn_end_frame = 0
        self._awaiting_reply = False  # a committed user turn waits for create_response (auto_reply off)
        self._last_user_turn_id: str | None = None
        self._last_reply: Response | None = None  # the latest finished reply (truncate_reply re-cuts it)
        self._non_finite_reported = False
        self._max_turn_frames = options.turn_detection.max_turn_ms // FRAME_MS
        self._max_response_positions = max(2, options.max_response_ms // CHUNK_MS)
        self._capacity = capacity
        self._high_water = high_water
        self._start(greeting, greeting_frames)

    # ------------------------------------------------------------------ setup
    def _start(self, greeting: object | None, greeting_frames: torch.Tensor | None) -> None:
        self.history.open_turn("system")
        self.history.append(self.fmt.first_turn(greeting, self.opts.instructions))
        self.history.close_turn()
        self._system_len = self.history.length
        if greeting_frames is not None and self.opts.play_greeting and len(greeting_frames) >= GROUP:
            resp = self._new_response(turn_id=None, greeting=True)
            resp.released = True
            resp.generating = False
            usable = (len(greeting_frames) // GROUP) * GROUP
            for i in range(0, usable, GROUP):
                resp.audio_positions.append(-1)
                resp.to_decode.append(greeting_frames[i : i + GROUP])
            self.response = resp
            self.emit(ev.ResponseStarted(resp.id, None, greeting=True))
            # the greeting's words, for transcripts (a multi-byte character cut at the end is dropped)
            words = self.fmt.decode_text(list(getattr(greeting, "text_ids", ()))).rstrip("\ufffd").strip()
            if words:
                resp.text_emitted = words
                self.emit(ev.TextDelta(resp.id, words))
            self.detector.agent_speaking = True

    def emit(self, event: ev.Event) -> None:
        self.emit_event(event)

    # ------------------------------------------------------------------ inputs (from the session handle)
    def push_audio(self, audio: NormalisedAudio) -> None:
        if audio.non_finite and not self._non_finite_reported:
            self._non_finite_reported = True
            self.emit(
                ev.ErrorEvent("invalid_audio", f"{audio.non_finite} non-finite samples replaced by silence")
            )
        self._pcm24.push(audio.codec)
        self.input_ms += audio.codec.size / 24.0
        if self.vad_enabled:
            self._pcm16.push(audio.vad)
        if self.input_ms >= self.opts.max_call_ms:
            raise SessionFailure(f"maximum call length of {self.opts.max_call_ms} ms reached")

    def push_text(self, text: str, respond: bool = True) -> None:
        if not text.strip():
            raise ValueError("empty text turn")
        self._stop_agent_for_new_turn(status="cancelled")
        if self.turn is not None and not self.turn.committed:
            self._discard_turn()
        self._fill_unanswered_turn()
        matrix = self.fmt.user_text_turn(text)
        self._maybe_trim_history(incoming=matrix.shape[1] // GROUP)
        turn = UserTurn(
            _new_id("turn"), "text", self.frames_encoded, self.history.length, self.history.length, 0
        )
        self.history.open_turn("user")
        self.history.append(matrix)
        self.history.close_turn()
        turn.committed = True
        self.turn = None
        ms = int(self.input_ms)
        self.emit(ev.TurnCommitted(turn.id, "text", ms, ms, "text"))
        if respond:
            self._start_reply(turn.id, released=True)
        else:
            self._await_reply(turn.id)

    def create_response(self, response_id: str | None = None) -> None:
        """Start a reply now (auto_reply off, or the agent speaking first / again).

        It answers the committed user turn still waiting for one, or else continues the agent's side
        of the conversation. A reply that finished generating and is still playing is let finish
        first; one still generating is an error. Audio appended since the last commit stays buffered
        for the next turn when the client controls turns; with VAD on, a turn in progress is an error.
        """
        resp = self.response
        if resp is not None:
            if resp.generating or not resp.done_sent:
                what = "the greeting is" if resp.greeting else "a reply is"
                raise ValueError(f"{what} already in progress; cancel it first")
            self._end_reply()
        turn = self.turn
        if turn is not None and not turn.committed:
            if self.vad_enabled:
                raise ValueError(
                    "the user is speaking (a turn is in progress): commit or clear the audio first"
                )
            self._drop_open_turn()  # its frames stay buffered; poll() reopens the turn after the reply
        if self._awaiting_reply:
            self._start_reply(self._last_user_turn_id, released=True, response_id=response_id)
        else:
            self._start_reply(None, released=True, response_id=response_id, agent_prefix=True)

    def _await_reply(self, turn_id: str) -> None:
        self._awaiting_reply = True
        self._last_user_turn_id = turn_id

    def _fill_unanswered_turn(self) -> int | None:
        """Before a new user turn: close the previous one's missing reply as an empty agent turn."""
        if not self._awaiting_reply:
            return None
        self._awaiting_reply = False
        pos = self.history.length
        self.history.open_turn("agent")
        self.history.append(self.fmt.agent_close(False))
        self.history.close_turn()
        return pos

    def commit(self) -> None:
        """End the user's turn now (client-controlled turns, or a manual override of the VAD)."""
        if (
            self.turn is None
            and self.response is not None
            and self.frames_encoded > self._last_turn_end_frame
        ):
            self._cut_response(status="cancelled")
        if self.turn is None and self.frames_encoded > self._last_turn_end_frame and self.response is None:
            self._open_audio_turn(self._last_turn_end_frame, int(self._last_turn_end_frame * FRAME_MS))
        if self.turn is None:
            raise ValueError("nothing to commit: no user audio since the last turn")
        self._commit_turn(self.frames_encoded, "commit")

    def clear(self) -> None:
        """Drop the user audio buffered so far (the turn in progress, if any)."""
        if self.turn is not None and not self.turn.committed:
            self._discard_turn()
        self._last_turn_end_frame = self.frames_encoded

    def interrupt(self) -> None:
        """Cancel the reply: cut its history to what was heard."""
        if self.response is not None:
            self._cut_response(status="cancelled")
            self._promote_barge_in()

    def _promote_barge_in(self) -> None:
        """The client stopped the reply while the user's sound over it was still being judged (too short
        to interrupt on its own yet): that sound is the user's next turn, from where it started."""
        start = self._candidate_start_frame
        if not self.detector.in_barge_in or start is None or self.turn is not None:
            return
        self.detector.end_barge_in()
        self._candidate_start_frame = None
        self._open_audio_turn(start, start * FRAME_MS)

    def playback_ack(self, ms: int, response_id: str | None) -> None:
        resp = self.response
        if resp is not None and (response_id is None or response_id == resp.id):
            resp.clock.ack(ms)

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

    def update_options(self, new: SessionOptions, greeting: object | None) -> list[str]:
        """Apply changed options mid-call; returns the names of fields that could not change.

        Turn detection, sampling (next reply), reply caps and flow control change at once. The
        system instructions and the greeting are the head of the prompt: they can change only
        before the first user turn (the prompt is then rebuilt); later they are reported back.
        """
        refused: list[str] = []
        old = self.opts
        head_changed = new.instructions != old.instructions or new.greeting != old.greeting
        if head_changed:
            if (
                len(self.history.turns) == 1
                and self.turn is None
                and (self.response is None or self.response.greeting)
            ):
                self._truncate(0)
                self.history.turns.clear()
                self.history.open_turn("system")
                self.history.append(self.fmt.first_turn(greeting, new.instructions))
                self.history.close_turn()
            else:
                refused += [f for f in ("instructions", "greeting") if getattr(new, f) != getattr(old, f)]
                new = new.model_copy(update={"instructions": old.instructions, "greeting": old.greeting})
        if not new.auto_reply and self.turn is not None and self.turn.spec_pos is not None:
            self._on_resume(0)  # no reply may start on its own any more
        if new.turn_detection != old.turn_detection:
            self.detector.opts = new.turn_detection
            self.vad_enabled = new.turn_detection.enabled
            self._max_turn_frames = new.turn_detection.max_turn_ms // FRAME_MS
        self._max_response_positions = max(2, new.max_response_ms // CHUNK_MS)
        self.opts = new
        return refused

    # ------------------------------------------------------------------ codec encode
    def input_pending(self) -> bool:
        """Pushed audio not yet encoded (whole frames) or, with VAD on, not yet judged by it."""
        if self._pcm24.size >= FRAME:
            return True
        return self.vad_enabled and self._pcm16.size >= WINDOW and self._vad_window_encoded()

    def _vad_window_encoded(self) -> bool:
        return (self.vad_windows + 1) * WINDOW * 1000 // 16000 <= self.frames_encoded * FRAME_MS

    def next_encode_input(self) -> np.ndarray | None:
        return self._pcm24.take(FRAME)

    def add_frame(self, tokens: np.ndarray) -> None:
        self.frames.append(tokens)
        self.frames_encoded += 1
        if not self.vad_enabled and self.turn is None and self.response is None and not self._awaiting_reply:
            self._open_audio_turn(self._last_turn_end_frame, self._last_turn_end_frame * FRAME_MS)
        self._sync_user_groups()
        self._enforce_turn_cap()
        self._trim_frames()

    # ------------------------------------------------------------------ VAD
    def next_vad_window(self) -> np.ndarray | None:
        # never judge audio the codec has not encoded yet: turn decisions cut the codec frames
        if not self._vad_window_encoded():
            return None
        return self._pcm16.take(WINDOW)

    @property
    def vad_ms(self) -> int:
        return self.vad_windows * WINDOW * 1000 // 16000

    def on_vad(self, prob: float) -> None:
        self.vad_windows += 1
        for sig in self.detector.feed(prob, self.vad_ms):
            self._on_signal(sig)
        self._sync_user_groups()

    def _on_signal(self, sig: TurnSignal) -> None:
        handler = {
            Signal.ONSET: self._on_onset,
            Signal.SPECULATE: self._on_speculate,
            Signal.RESUME: self._on_resume,
            Signal.END_OF_TURN: self._on_end_of_turn,
            Signal.SHORT_SOUND_OVER: self._on_short_sound_over,
            Signal.INTERRUPTION: self._on_interruption,
        }[sig.kind]
        handler(sig.time_ms)

    def _on_onset(self, t_ms: int) -> None:
        self.emit(ev.SpeechStarted(t_ms))
        start_ms = max(0, t_ms - self.opts.turn_detection.prefix_padding_ms)
        start_frame = max(start_ms // FRAME_MS, self._last_turn_end_frame)
        if self.detector.in_barge_in:
            self._candidate_start_frame = start_frame
            if self.response is not None and self.response.released:
                self.response.clock.pause()
                self.emit(ev.OutputPaused(self.response.id))
            return
        if self.turn is None:
            self._open_audio_turn(start_frame, start_frame * FRAME_MS)

    def _on_short_sound_over(self, t_ms: int) -> None:
        self.emit(ev.SpeechStopped(t_ms))
        self._candidate_start_frame = None
        if self.response is not None and self.response.clock.paused:
            self.response.clock.resume()
            self.emit(ev.OutputResumed(self.response.id))

    def _on_interruption(self, t_ms: int) -> None:
        start = self._candidate_start_frame
        self._candidate_start_frame = None
        if self.response is not None:
            self._cut_response(status="interrupted")
        if self.turn is None:
            start = start if start is not None else max(t_ms // FRAME_MS, self._last_turn_end_frame)
            self._open_audio_turn(start, start * FRAME_MS)

    def _on_speculate(self, t_ms: int) -> None:
        turn = self.turn
        if turn is None or turn.committed or turn.kind != "audio" or self.response is not None:
            return
        if not self.opts.auto_reply:
            return
        end_frame = self._speech_end_frame(t_ms)
        turn.spec_pos = self._close_audio_turn(turn, end_frame)
        self._start_reply(turn.id, released=False)
        self.response.speculative = True  # type: ignore[union-attr]
        self.stats["speculations"] += 1

    def _on_resume(self, t_ms: int) -> None:
        turn = self.turn
        if turn is None or turn.spec_pos is None or turn.committed:
            return
        resp = self.response
        if resp is not None and not resp.released:
            self.response = None
        self.stats["speculation_rollbacks"] += 1
        self._truncate(turn.spec_pos)
        self.history.turns[-1].end = None  # the user turn is open again
        turn.spec_pos = None
        turn.end_frame = None
        self._sync_user_groups()

    def _on_end_of_turn(self, t_ms: int) -> None:
        self.emit(ev.SpeechStopped(t_ms))
        if self.turn is not None and not self.turn.committed:
            self._commit_turn(self._speech_end_frame(t_ms), "vad", end_ms=t_ms)

    # ------------------------------------------------------------------ user turns
    def _speech_end_frame(self, t_ms: int) -> int:
        return min(self.frames_encoded, -(-t_ms // FRAME_MS))

    def _open_audio_turn(self, start_frame: int, start_ms: int) -> None:
        if self.response is not None:
            return  # opened once the reply is over (see _finish_response)
        self._maybe_trim_history()
        filler = self._fill_unanswered_turn()
        turn = UserTurn(_new_id("turn"), "audio", start_frame, self.history.length, 0, start_ms)
        turn.filler_pos = filler
        self.history.open_turn("user")
        self.history.append(self.fmt.user_audio_open())
        turn.groups_pos = self.history.length
        self.turn = turn
        self._sync_user_groups()

    def _sync_user_groups(self) -> None:
        """Append the user's complete 3-frame groups that are certainly part of the turn."""
        turn = self.turn
        if turn is None or turn.kind != "audio" or turn.end_frame is not None or self.response is not None:
            return
        limit = self.frames_encoded
        if self.vad_enabled:
            # only frames the VAD has already judged, and none after a silence began
            limit = min(limit, self.vad_ms // FRAME_MS)
            silence_start = self.detector.silence_start_ms()
            if silence_start is not None:
                limit = min(limit, silence_start // FRAME_MS)
        while turn.start_frame + GROUP * (turn.groups + 1) <= limit:
            f0 = turn.start_frame + GROUP * turn.groups
            self.history.append(self.fmt.user_audio_groups(self._frame_tensor(f0, f0 + GROUP)))
            turn.groups += 1

    def _close_audio_turn(self, turn: UserTurn, end_frame: int) -> int:
        """Append the turn's tail (last frames, silence padding, end markers); returns where it starts."""
        self._sync_user_groups()
        end_frame = max(end_frame, turn.start_frame)
        keep_groups = min(turn.groups, (end_frame - turn.start_frame) // GROUP)
        if keep_groups < turn.groups:
            self._truncate(turn.groups_pos + keep_groups)
            turn.groups = keep_groups
        tail_pos = self.history.length
        first = turn.start_frame + GROUP * turn.groups
        self.history.append(self.fmt.user_audio_close(self._frame_tensor(first, end_frame)))
        self.history.close_turn()
        turn.end_frame = end_frame
        return tail_pos

    def _commit_turn(self, end_frame: int, reason: str, end_ms: int | None = None) -> None:
        turn = self.turn
        assert turn is not None
        if turn.end_frame is None:
            self._close_audio_turn(turn, end_frame)
        turn.committed = True
        self._last_turn_end_frame = max(self._last_turn_end_frame, turn.end_frame or end_frame)
        self.turn = None
        t_end = end_ms if end_ms is not None else (turn.end_frame or end_frame) * FRAME_MS
        self.emit(ev.TurnCommitted(turn.id, "audio", turn.start_ms, t_end, reason))  # type: ignore[arg-type]
        resp = self.response
        endpoint_ms = float(self.vad_ms - t_end) if reason == "vad" else None
        if resp is not None and not resp.released and resp.turn_id == turn.id:
            self.stats["speculative_hits"] += 1
            self._release(resp, endpoint_ms=endpoint_ms)
        elif self.opts.auto_reply:
            self._start_reply(turn.id, released=True, endpoint_ms=endpoint_ms)
        else:
            self._await_reply(turn.id)

    def _discard_turn(self) -> None:
        turn = self.turn
        assert turn is not None
        if self.response is not None and not self.response.released:
            self.response = None
        self._drop_open_turn()
        self.emit(ev.TurnDiscarded(turn.id))

    def _drop_open_turn(self) -> None:
        """Take the open user turn out of the history (with the empty reply inserted before it)."""
        turn = self.turn
        assert turn is not None
        self._truncate(turn.open_pos if turn.filler_pos is None else turn.filler_pos)
        if turn.filler_pos is not None:
            self._awaiting_reply = True
        self.turn = None

    def _enforce_turn_cap(self) -> None:
        turn = self.turn
        if turn is None or turn.committed or turn.kind != "audio":
            return
        room = self._capacity - self.history.length - self._max_response_positions - 16
        if self.frames_encoded - turn.start_frame >= self._max_turn_frames or room <= GROUP:
            if turn.spec_pos is not None:
                self._on_resume(0)
            self._commit_turn(self.frames_encoded, "max_turn")

    # ------------------------------------------------------------------ replies
    def _new_response(
        self, turn_id: str | None, greeting: bool = False, response_id: str | None = None
    ) -> Response:
        clock = PlaybackClock(self.opts.flow_control, self._now)
        return Response(
            response_id or _new_id("greet" if greeting else "resp"),
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

    # ------------------------------------------------------------------ history housekeeping
    def _truncate(self, length: int) -> None:
        if length < self.cache_len:
            self._lm_rollback(length)
            self.cache_len = length
        self.pending_ok = self.pending_ok and self.cache_len == length == self.history.length
        self.history.truncate(length)
        if self.cache_len < self.history.length:
            self.pending_ok = False

    def _reserve(self) -> int:
        """Positions one more exchange may need: a whole user turn and a whole reply, plus markers."""
        return min(self._max_turn_frames // GROUP + self._max_response_positions + 32, self._capacity // 2)

    def _maybe_trim_history(self, incoming: int = 0) -> None:
        """Drop the oldest whole turns (system text and greeting stay) when the next exchange might
        not fit, or when the history passed the high-water mark. The cache is rolled back to the
        first changed position and the scheduler re-prefills the rest, so the call has no gap."""
        reserve = self._reserve()
        high = int(self._capacity * self._high_water)
        if self.history.length + incoming + reserve <= self._capacity and self.history.length <= high:
            return
        target = int(min(high, self._capacity - reserve - incoming) * 0.75)
        changed = self.history.drop_oldest_turns("system", max(target, 0))
        if changed is not None:
            self.stats["trims"] += 1
        if changed is not None and changed < self.cache_len:
            self._lm_rollback(changed)
            self.cache_len = changed
            self.pending_ok = False

    def prefill_need(self) -> int:
        return self.history.length - self.cache_len

    def prefill_slice(self, n: int) -> torch.Tensor:
        return self.history.matrix(self.cache_len, self.cache_len + n)

    def on_prefilled(self, n: int) -> None:
        self.cache_len += n
        self.pending_ok = self.cache_len == self.history.length

    # ------------------------------------------------------------------ helpers
    def _frame_tensor(self, start: int, end: int) -> torch.Tensor:
        if end <= start:
            return torch.zeros((0, 3), dtype=torch.long)
        a, b = start - self._frame_base, end - self._frame_base
        if a < 0:
            raise SessionFailure(f"codec frames {start}..{end} were already discarded")
        return torch.from_numpy(np.stack(self.frames[a:b])).long()

    def _trim_frames(self) -> None:
        keep_from = self.frames_encoded - (self.opts.turn_detection.prefix_padding_ms // FRAME_MS + 50)
        if self.turn is not None:
            keep_from = min(keep_from, self.turn.start_frame)
        if self._candidate_start_frame is not None:
            keep_from = min(keep_from, self._candidate_start_frame)
        if not self.vad_enabled:
            keep_from = min(keep_from, self._last_turn_end_frame)
        drop = keep_from - self._frame_base
        if drop > 256:
            del self.frames[:drop]
            self._frame_base += drop


class SampleQueue:
    """FIFO of float32 samples fed in arbitrary pieces and consumed in fixed-size blocks."""

    def __init__(self) -> None:
        self._parts: deque[np.ndarray] = deque()
        self.size = 0

    def push(self, samples: np.ndarray) -> None:
        if samples.size:
            self._parts.append(samples)
            self.size += samples.size

    def take(self, n: int) -> np.ndarray | None:
        if self.size < n:
            return None
        out = np.empty(n, dtype=np.float32)
        filled = 0
        while filled < n:
            head = self._parts[0]
            k = min(n - filled, head.size)
            out[filled : filled + k] = head[:k]
            filled += k
            if k == head.size:
                self._parts.popleft()
            else:
                self._parts[0] = head[k:]
        self.size -= n
        return out
