"""Prompt format pieces, incremental user turns, greetings and reading replies back."""

from __future__ import annotations

import json
import random

import pytest
import torch

from sg2_runtime.lm import GreetingError, UserSpeechStream, choose_greeting, load_greetings, validate_greeting
from sg2_runtime.lm.greetings import parse_greetings
from sg2_runtime.lm.prompt import (
    SILENCE_FRAME,
    flat_to_matrix,
    matrix_to_flat,
    pad_user_audio,
    system_text,
)
from tests.lm_util import single_thread, tiny_lm  # noqa: F401


@pytest.fixture(scope="module")
def lm(reference_dir):
    return tiny_lm(reference_dir)


@pytest.mark.parametrize(
    ("frames", "padded"), [(0, 9), (1, 12), (2, 12), (3, 12), (4, 15), (13, 24), (14, 24)]
)
def test_silence_padding_rule(frames, padded):
    audio = torch.randint(0, 1024, (frames, 3))
    out = pad_user_audio(audio)
    assert out.shape == (padded, 3)
    assert torch.equal(out[:frames], audio)
    assert (out[frames:] == torch.tensor(SILENCE_FRAME)).all()
    assert padded - frames >= 9 or (padded - frames == 8 + (3 - (frames + 8) % 3))


@pytest.mark.parametrize("frames", [0, 1, 2, 3, 4, 5, 14, 31])
def test_incremental_user_turn_equals_whole_turn(lm, frames):
    fmt = lm.prompt
    audio = torch.randint(0, 1024, (frames, 3), generator=torch.Generator().manual_seed(frames))
    whole = fmt.user_speech_turn(audio)
    # By hand: prefix, whole groups of 3 frames as they arrive, then the suffix with the leftovers.
    groups = [fmt.user_speech(audio[i : i + 3]) for i in range(0, frames - frames % 3, 3)]
    manual = torch.cat(
        [fmt.user_turn_prefix(), *groups, fmt.user_turn_suffix(audio[frames - frames % 3 :])], 1
    )
    assert torch.equal(manual, whole)
    # Through UserSpeechStream with random chunk sizes (including empty pushes).
    rng = random.Random(frames)
    stream = UserSpeechStream(fmt)
    parts = [stream.start()]
    i = 0
    while i < frames:
        n = rng.randint(0, 4)
        parts.append(stream.push(audio[i : i + n]))
        i += n
    parts.append(stream.finish())
    assert torch.equal(torch.cat(parts, 1), whole)
    assert stream.frames_pushed == frames


def test_user_turn_structure(lm):
    fmt, sp = lm.prompt, lm.special
    audio = torch.randint(0, 1024, (7, 3))
    m = fmt.user_speech_turn(audio)
    text = m[0, ::3].tolist()
    human = fmt.encode("[|Human|]: ")
    tail = fmt.encode(" ###\n[|SpeechGPT|]: ")
    assert text[: len(human)] == human and text[-len(tail) :] == tail
    seg = text[len(human) : len(text) - len(tail)]
    assert seg[0] == sp.sosp and seg[-1] == sp.eosp and set(seg[1:-1]) == {sp.empty}
    assert len(seg) - 2 == 18 // 3  # 7 frames + 8 silence + 3 = 18 frames
    assert (m[0].reshape(-1, 3)[:, 1:] == -100).all()
    speech = m[1:, 3 * len(human) : 3 * (len(human) + len(seg))]
    assert (speech[:, :3] == 1024).all() and (speech[:, -3:] == 1024).all()
    assert torch.equal(speech[:, 3:10].t(), audio)
    assert (speech[:, 10:-3].t() == torch.tensor(SILENCE_FRAME)).all()


def test_text_pieces_and_agent_closing(lm):
    fmt, sp = lm.prompt, lm.special
    t = fmt.user_text_turn("hello")
    assert t[0, ::3].tolist() == fmt.encode("[|Human|]: ") + fmt.encode("hello") + fmt.encode(
        " ###\n[|SpeechGPT|]: "
    )
    assert (t[1:] == 1024).all()
    closing = fmt.agent_turn_closing(in_speech=True)[0, ::3].tolist()
    assert closing == [sp.eosp, *fmt.encode(" ###\n"), sp.eos]
    assert fmt.agent_turn_closing(in_speech=False)[0, ::3].tolist() == [*fmt.encode(" ###\n"), sp.eos]
    assert system_text("speech", "text").endswith("questions in text.\n\n\n")
    with pytest.raises(ValueError):
        system_text("video", "text")


def test_speech_segment_pads_and_cuts_text(lm):
    fmt, sp = lm.prompt, lm.special
    frames = torch.randint(0, 1024, (6, 3))
    assert fmt.speech_segment(frames, [5])[0, ::3].tolist() == [sp.sosp, 5, sp.empty, sp.eosp]
    assert fmt.speech_segment(frames, [5, 6, 7])[0, ::3].tolist() == [sp.sosp, 5, 6, sp.eosp]
    with pytest.raises(ValueError, match="multiple of 3"):
        fmt.speech_segment(frames[:5])


def test_flat_layout_round_trip(lm):
    m = lm.prompt.user_speech_turn(torch.randint(0, 1024, (5, 3)))
    flat = matrix_to_flat(m)
    assert flat[:12].tolist()[4] == -100 and flat.numel() == m.numel()
    assert torch.equal(flat_to_matrix(flat), m)


def test_parse_reply_reads_text_and_speech(lm):
    fmt, sp = lm.prompt, lm.special
    frames = torch.randint(0, 1024, (6, 3))
    words = fmt.encode("You are")
    reply = torch.cat(
        [fmt.speech_segment(frames, words), fmt.text_segment(" ###\n"), fmt.text_segment([sp.eos])], dim=1
    )
    parsed = fmt.parse_reply(reply)
    assert torch.equal(parsed.speech, frames)
    assert parsed.text == "You are ###\n"
    open_reply = fmt.speech_segment(frames, words)[:, :-3]  # interrupted: no <|eosp|> yet
    assert torch.equal(fmt.parse_reply(open_reply).speech, frames)
    assert fmt.parse_reply(fmt.text_segment("hi")).speech.shape == (0, 3)


def test_official_greetings_validate(reference_dir):
    greetings = load_greetings(reference_dir / "greetings.jsonl", vocab_size=152064)
    assert len(greetings) == 24
    for g in greetings:
        assert g.num_frames % 3 == 0 and len(g.text_ids) <= g.num_frames // 3
        assert g.frames.shape == (g.num_frames, 3)
    assert torch.equal(greetings[0].frames[0], torch.tensor(SILENCE_FRAME))
    assert choose_greeting(greetings, index=5) is greetings[5]
    assert choose_greeting(greetings, seed=11) is choose_greeting(greetings, seed=11)
    assert len({id(choose_greeting(greetings, seed=s)) for s in range(20)}) > 1
    with pytest.raises(GreetingError):
        choose_greeting(greetings, index=24)
    with pytest.raises(GreetingError, match=r"\[0, 1000\)"):
        load_greetings(reference_dir / "greetings.jsonl", vocab_size=1000)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"text": [1], "audio": [1] * 10}, "multiple of 9"),
        ({"text": [1], "audio": []}, "multiple of 9"),
        ({"text": [1], "audio": [1] * 8 + [1024]}, r"\[0, 1024\)"),
        ({"text": [1], "audio": [-1] + [1] * 8}, r"\[0, 1024\)"),
        ({"text": [1, 2], "audio": [1] * 9}, "covers only 1 positions"),
        ({"text": [5000], "audio": [1] * 9}, r"\[0, 2000\)"),
        ({"text": [1.5], "audio": [1] * 9}, "integers"),
        ({"audio": [1] * 9}, "'text' and 'audio'"),
    ],
)
def test_greeting_validation_errors(entry, message):
    with pytest.raises(GreetingError, match=message):
        validate_greeting(entry, vocab_size=2000)


def test_greeting_file_errors_name_the_line():
    good = json.dumps({"text": [1], "audio": [1] * 9})
    with pytest.raises(GreetingError, match=r"g\.jsonl:2: not JSON"):
        parse_greetings([good, "{oops"], source="g.jsonl")
    with pytest.raises(GreetingError, match=r"g\.jsonl:3: .*multiple of 9"):
        parse_greetings([good, "", json.dumps({"text": [], "audio": [1]})], source="g.jsonl")
    with pytest.raises(GreetingError, match="no greetings"):
        parse_greetings(["", " "], source="g.jsonl")
