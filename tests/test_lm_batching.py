"""Batched decoding: sessions at different lengths share forwards without affecting each other."""

from __future__ import annotations

import pytest
import torch

from sg2_runtime.lm import CapacityError, LMStateError, SamplingParams
from tests.lm_util import golden, golden_prompt, single_thread, sosp_position, tiny_lm  # noqa: F401

GREEDY = SamplingParams(greedy=True)
STEPS = 8


@pytest.fixture(scope="module")
def gold(reference_dir):
    return golden(reference_dir)


def prompts(lm, gold) -> list[torch.Tensor]:
    """Three prompts of different lengths; the second is in speech mode, the third a text turn."""
    full = golden_prompt(lm, gold)
    return [
        full,
        torch.cat([full[:, :-12], sosp_position(lm)], dim=1),
        torch.cat([lm.prompt.system_and_greeting(None), lm.prompt.user_text_turn("hi there")], dim=1),
    ]


def run_alone(reference_dir, prompt, sampling, seed, steps, **options):
    lm = tiny_lm(reference_dir, **options)
    sess = lm.open_session(sampling, seed=seed)
    lm.prefill(sess, prompt)
    return [lm.step([sess], return_logits=True)[0] for _ in range(steps)]


def assert_same(a, b):
    assert [(o.text_id, o.position, o.in_speech, o.has_speech, o.finish) for o in a] == [
        (o.text_id, o.position, o.in_speech, o.has_speech, o.finish) for o in b
    ]
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.speech, y.speech)
        torch.testing.assert_close(x.text_logits, y.text_logits, atol=1e-4, rtol=0)
        assert (x.speech_logits is None) == (y.speech_logits is None)
        if x.speech_logits is not None:
            torch.testing.assert_close(x.speech_logits, y.speech_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("static", "sampling"),
    [(False, GREEDY), (True, GREEDY), (False, SamplingParams()), (True, SamplingParams(top_k=0, top_p=0.8))],
)
def test_three_sessions_batched_equal_each_alone(reference_dir, gold, static, sampling):
    lm = tiny_lm(reference_dir, static_step=static)
    ps = prompts(lm, gold)
    assert len({p.shape[1] for p in ps}) == 3
    sessions = [lm.open_session(sampling, seed=10 + i) for i in range(3)]
    for s, p in zip(sessions, ps, strict=True):
        lm.prefill(s, p)
    batched = [[] for _ in sessions]
    for _ in range(STEPS):
        for i, o in enumerate(lm.step(sessions, return_logits=True)):
            batched[i].append(o)
    assert any(o.has_speech for o in batched[1]), "the speech-mode session produced no speech"
    for i, p in enumerate(ps):
        assert_same(batched[i], run_alone(reference_dir, p, sampling, 10 + i, STEPS))


def test_static_step_equals_eager_step(reference_dir, gold):
    ps = prompts(tiny_lm(reference_dir), gold)
    outs = {}
    for static in (False, True):
        lm = tiny_lm(reference_dir, static_step=static)
        sessions = [lm.open_session(SamplingParams(), seed=i) for i in range(3)]
        lm.prefill_many(list(zip(sessions, ps, strict=True)))
        outs[static] = [lm.step(sessions, return_logits=True) for _ in range(STEPS)]
    for a, b in zip(outs[False], outs[True], strict=True):
        assert_same(a, b)


def test_join_and_leave_mid_way_do_not_change_the_others(reference_dir, gold):
    lm = tiny_lm(reference_dir)
    ps = prompts(lm, gold)
    a = lm.open_session(GREEDY, seed=1)
    b = lm.open_session(GREEDY, seed=2)
    lm.prefill(a, ps[0])
    lm.prefill(b, ps[1])
    outs_a = []
    c = None
    for step in range(STEPS):
        if step == 3:  # c joins: its prompt is prefilled between the others' steps
            c = lm.open_session(GREEDY, seed=3)
            lm.prefill(c, ps[2])
        if step == 5:  # b leaves
            lm.close_session(b)
        active = [s for s in (a, b, c) if s is not None and not s.closed]
        outs_a.append(lm.step(active, return_logits=True)[0])
    assert_same(outs_a, run_alone(reference_dir, ps[0], GREEDY, 1, STEPS))
    # The slot b freed is reused by a new session without leaking b's history.
    d = lm.open_session(GREEDY, seed=2)
    assert d.slot == 1 and d.position == 0
    lm.prefill(d, ps[1])
    d_outs = [lm.step([a, d, c], return_logits=True)[1] for _ in range(3)]
    assert_same(d_outs, run_alone(reference_dir, ps[1], GREEDY, 2, 3))


def test_prefill_many_and_chunked_prefill_equal_one_prefill(reference_dir, gold):
    ref = tiny_lm(reference_dir)
    ps = prompts(ref, gold)
    expected = []
    for p in ps:
        s = ref.open_session(GREEDY)
        ref.prefill(s, p)
        expected.append(ref.pending_hidden(s))
        ref.close_session(s)
    lm = tiny_lm(reference_dir, prefill_chunk=16)
    sessions = [lm.open_session(GREEDY) for _ in ps]
    # Uneven pieces: 1, 5, then the rest, interleaved across sessions in prefill_many calls.
    cuts = [(0, 3), (3, 18)]
    for lo, hi in cuts:
        lm.prefill_many([(s, p[:, lo:hi]) for s, p in zip(sessions, ps, strict=True)])
    lm.prefill_many([(s, p[:, 18:]) for s, p in zip(sessions, ps, strict=True)])
    for s, p, h in zip(sessions, ps, expected, strict=True):
        assert s.position == p.shape[1] // 3
        assert torch.equal(s.history(), p)
        torch.testing.assert_close(lm.pending_hidden(s), h, atol=1e-5, rtol=0)


def test_sampling_is_reproducible_per_seed_and_differs_across_seeds(reference_dir, gold):
    lm = tiny_lm(reference_dir)
    p = golden_prompt(lm, gold)
    sampling = SamplingParams(temperature=1.5, top_p=1.0, top_k=0)
    s1, s2, s3 = (lm.open_session(sampling, seed=seed) for seed in (7, 7, 8))
    for s in (s1, s2, s3):
        lm.prefill(s, p)
        s.force_next_text = lm.special.sosp
    runs = [[], [], []]
    for _ in range(STEPS):
        for i, o in enumerate(lm.step([s1, s2, s3])):
            runs[i].append((o.text_id, o.speech.tolist()))
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    speech = torch.tensor([sp for _, sp in runs[0][1:]])
    assert (speech < 1024).all(), "the zero-embedding index must never be sampled"


def test_session_state_errors_and_capacity(reference_dir, gold):
    lm = tiny_lm(reference_dir, max_sessions=2, max_positions=40)
    a = lm.open_session(GREEDY)
    b = lm.open_session(GREEDY)
    with pytest.raises(CapacityError):
        lm.open_session()
    with pytest.raises(LMStateError, match="pending"):
        lm.step([a])
    with pytest.raises(CapacityError, match="max_positions"):
        lm.prefill(a, golden_prompt(lm, gold))
    assert a.position == 0
    lm.prefill(a, golden_prompt(lm, gold)[:, : 3 * 38])
    with pytest.raises(ValueError, match="twice"):
        lm.step([a, a])
    outs = [lm.step([a])[0] for _ in range(2)]
    assert outs[0].finish is None
    assert outs[-1].finish == "length" and a.position == 40
    with pytest.raises(CapacityError, match="full"):
        lm.step([a])
    lm.close_session(b)
    with pytest.raises(LMStateError, match="closed"):
        lm.prefill(b, sosp_position(lm))
    with pytest.raises(ValueError, match="speech ids"):
        bad = sosp_position(lm)
        bad[1, 0] = 1025
        lm.prefill(lm.open_session(), bad)


def test_response_cap_eos_and_forced_text(reference_dir, gold):
    lm = tiny_lm(reference_dir)
    s = lm.open_session(GREEDY)
    lm.prefill(s, golden_prompt(lm, gold))
    s.begin_response(max_positions=3)
    s.force_next_text = lm.special.sosp
    outs = [lm.step([s])[0] for _ in range(3)]
    assert outs[0].text_id == lm.special.sosp and s.force_next_text is None
    assert [o.finish for o in outs] == [None, None, "length"]
    assert s.response_positions == 3
    s.force_next_text = lm.special.eos
    out = lm.step([s])[0]
    assert out.finish == "eos" and out.text_id == lm.special.eos
    # The eos position is part of the history and the cache: the session has a pending state again.
    assert s.text_ids()[-1] == lm.special.eos and s.has_pending
