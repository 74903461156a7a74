"""Rollback: trimming the history and decoding again gives what never going past would have given."""

from __future__ import annotations

import pytest
import torch

from sg2_runtime.lm import LMStateError, SamplingParams
from tests.lm_util import golden, golden_prompt, single_thread, tiny_lm  # noqa: F401

STEPS = 8


@pytest.fixture(scope="module")
def gold(reference_dir):
    return golden(reference_dir)


def summary(outs):
    return [(o.text_id, o.position, o.speech.tolist(), o.in_speech, o.has_speech) for o in outs]


@pytest.mark.parametrize("sampling", [SamplingParams(greedy=True), SamplingParams(temperature=1.2)])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_rollback_and_redecode_is_identical(reference_dir, gold, sampling, k):
    lm = tiny_lm(reference_dir)
    sess = lm.open_session(sampling, seed=5)
    prompt = golden_prompt(lm, gold)
    lm.prefill(sess, prompt)
    sess.force_next_text = lm.special.sosp  # cover speech mode and the modality counters
    first = [lm.step([sess], return_logits=True)[0] for _ in range(STEPS)]
    history = sess.history()
    end = sess.position
    keep = end - k  # roll back k positions ...
    lm.rollback(sess, keep)
    assert sess.position == keep and not sess.has_pending
    with pytest.raises(LMStateError):
        lm.step([sess])
    # ... and restore the pending state by re-running the last kept position.
    lm.rollback(sess, keep - 1)
    lm.prefill(sess, history[:, 3 * (keep - 1) : 3 * keep])
    again = [lm.step([sess], return_logits=True)[0] for _ in range(k)]
    assert summary(again) == summary(first[-k:])
    for a, b in zip(again, first[-k:], strict=True):
        torch.testing.assert_close(a.text_logits, b.text_logits, atol=1e-4, rtol=0)
    assert torch.equal(sess.history(), history)


def test_rollback_restores_modality_without_rescanning(reference_dir, gold):
    lm = tiny_lm(reference_dir)
    sess = lm.open_session(SamplingParams(greedy=True))
    prompt = golden_prompt(lm, gold)
    n = prompt.shape[1] // 3
    lm.prefill(sess, prompt)
    assert not sess.in_speech
    sess.force_next_text = lm.special.sosp
    lm.step([sess])
    assert sess.in_speech
    sess.force_next_text = lm.special.eosp
    out = lm.step([sess])[0]
    assert not out.in_speech and not out.has_speech and not sess.in_speech
    lm.rollback(sess, n + 1)
    assert sess.in_speech
    lm.rollback(sess, n)
    assert not sess.in_speech
    # Into the greeting's speech segment (between its <|sosp|> and <|eosp|>).
    sosp_at = prompt[0, ::3].tolist().index(lm.special.sosp)
    lm.rollback(sess, sosp_at + 2)
    assert sess.in_speech


def test_rollback_into_the_prompt_then_new_continuation_equals_fresh_session(reference_dir, gold):
    lm = tiny_lm(reference_dir)
    prompt = golden_prompt(lm, gold)
    other = torch.cat([prompt[:, :-30], lm.prompt.user_text_turn("what?")], dim=1)
    sess = lm.open_session(SamplingParams(greedy=True))
    lm.prefill(sess, prompt)
    [lm.step([sess]) for _ in range(4)]
    lm.rollback(sess, prompt.shape[1] // 3 - 10)
    lm.prefill(sess, other[:, prompt.shape[1] - 30 :])
    fresh = lm.open_session(SamplingParams(greedy=True))
    lm.prefill(fresh, other)
    assert torch.equal(sess.history(), fresh.history())
    a = [lm.step([sess, fresh], return_logits=True) for _ in range(5)]
    assert summary([x for x, _ in a]) == [(t, p, s, i, h) for (t, p, s, i, h) in summary([y for _, y in a])]
    for x, y in a:
        torch.testing.assert_close(x.text_logits, y.text_logits, atol=1e-4, rtol=0)


def test_rollback_bounds(reference_dir, gold):
    lm = tiny_lm(reference_dir)
    sess = lm.open_session()
    lm.prefill(sess, golden_prompt(lm, gold))
    with pytest.raises(ValueError):
        lm.rollback(sess, sess.position + 1)
    with pytest.raises(ValueError):
        lm.rollback(sess, -1)
    lm.rollback(sess, 0)
    assert sess.position == 0 and sess.history().shape == (4, 0)
