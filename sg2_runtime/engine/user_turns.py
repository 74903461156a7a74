"""User turns: the VAD's turn-taking signals, streaming the caller's speech into the history, the
speculative start and its rollback, commits, barge-in onsets. A mixin of :class:`Conversation`
(it works on the conversation's state; see conversation.py for the invariants)."""

from __future__ import annotations

from dataclasses import dataclass

from . import events as ev
from .base import FRAME_MS, GROUP, new_id


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


class UserTurns:
    """Turn-taking half of :class:`~sg2_runtime.engine.conversation.Conversation`."""

    def _promote_barge_in(self) -> None:
        """The client stopped the reply while the user's sound over it was still being judged (too short
        to interrupt on its own yet): that sound is the user's next turn, from where it started."""
        start = self._candidate_start_frame
        if not self.detector.in_barge_in or start is None or self.turn is not None:
            return
        self.detector.end_barge_in()
        self._candidate_start_frame = None
        self._open_audio_turn(start, start * FRAME_MS)

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
        turn = UserTurn(new_id("turn"), "audio", start_frame, self.history.length, 0, start_ms)
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
