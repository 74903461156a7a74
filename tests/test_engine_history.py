"""The history buffer: append/truncate and dropping the oldest whole turns near the context limit."""

from __future__ import annotations

import pytest
import torch

from sg2_runtime.engine.history import History


def _positions(n: int, tag: int) -> torch.Tensor:
    m = torch.full((4, 3 * n), -100, dtype=torch.long)
    m[0, ::3] = tag
    m[1:, :] = 1024
    return m


def _build() -> History:
    h = History(64)
    h.open_turn("system")
    h.append(_positions(5, 1))
    h.close_turn()
    for i, role in enumerate(["user", "agent", "user", "agent", "user"]):
        h.open_turn(role)
        h.append(_positions(4, 10 + i))
        h.close_turn()
    return h


def test_append_truncate_roundtrip_and_overflow() -> None:
    h = History(8)
    assert h.append(_positions(3, 7)) == 0
    assert h.append(_positions(2, 8)) == 3
    assert h.text_ids(0).tolist() == [7, 7, 7, 8, 8]
    h.truncate(4)
    assert h.length == 4 and h.text_ids(0).tolist() == [7, 7, 7, 8]
    with pytest.raises(OverflowError):
        h.append(_positions(5, 9))
    with pytest.raises(ValueError):
        h.append(torch.zeros((4, 4), dtype=torch.long))


def test_drop_oldest_turns_keeps_system_and_starts_with_a_user_turn() -> None:
    h = _build()
    assert h.length == 25
    changed = h.drop_oldest_turns("system", target=18)
    assert changed == 5
    # dropped user(10)+agent(11); kept user(12), agent(13), user(14)
    assert h.text_ids(0).tolist() == [1] * 5 + [12] * 4 + [13] * 4 + [14] * 4
    assert [(t.role, t.start, t.end) for t in h.turns] == [
        ("system", 0, 5),
        ("user", 5, 9),
        ("agent", 9, 13),
        ("user", 13, 17),
    ]


def test_drop_never_removes_the_open_turn() -> None:
    h = _build()
    h.open_turn("agent")
    h.append(_positions(3, 99))
    assert h.drop_oldest_turns("system", target=0) == 5
    assert h.turns[-1].role == "agent" and h.turns[-1].end is None
    assert h.text_ids(h.turns[-1].start).tolist() == [99, 99, 99]


def test_replace_shifts_what_follows_and_resizes_the_holding_turn() -> None:
    h = _build()  # system 0-5, user 5-9, agent 9-13, user 13-17, agent 17-21, user 21-25
    delta = h.replace(11, 13, _positions(1, 99))  # agent 9-13 loses its last two positions for one
    assert delta == -1 and h.length == 24
    assert h.text_ids(0).tolist() == [1] * 5 + [10] * 4 + [11] * 2 + [99] + [12] * 4 + [13] * 4 + [14] * 4
    assert [(t.role, t.start, t.end) for t in h.turns] == [
        ("system", 0, 5),
        ("user", 5, 9),
        ("agent", 9, 12),
        ("user", 12, 16),
        ("agent", 16, 20),
        ("user", 20, 24),
    ]
    h.open_turn("agent")
    h.append(_positions(2, 50))  # an open turn after the replaced range moves too and stays open
    assert h.replace(5, 7, _positions(4, 77)) == 2
    assert [(t.role, t.start, t.end) for t in h.turns][-2:] == [("user", 22, 26), ("agent", 26, None)]
    assert h.text_ids(26).tolist() == [50, 50]
    with pytest.raises(ValueError):
        h.replace(3, 2, _positions(1, 0))
    with pytest.raises(OverflowError):
        h.replace(0, 0, _positions(64, 0))
