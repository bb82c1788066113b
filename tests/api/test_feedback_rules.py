"""The pure rules of feedback sessions: Kendall's tau-b, the export's ranking rules, label checks."""

from __future__ import annotations

import io
import math

import pytest

from tuneforge_api.feedback.agreement import item_agreement, kendall_tau_b, session_agreement
from tuneforge_api.feedback.export import Answer, LabelView, export_record, label_positions, to_jsonl
from tuneforge_api.feedback.labels import LabelError, check_label, shuffled_for
from tuneforge_api.validation import validate_jsonl


def test_tau_b_by_hand() -> None:
    assert kendall_tau_b([["x"], ["y"], ["z"]], [["x"], ["y"], ["z"]]) == 1.0
    assert kendall_tau_b([["x"], ["y"], ["z"]], [["z"], ["y"], ["x"]]) == -1.0
    # One discordant pair of three.
    assert kendall_tau_b([["x"], ["y"], ["z"]], [["x"], ["z"], ["y"]]) == pytest.approx(1 / 3)
    # A tie in one ranking: (C - D) / sqrt((n0 - n1)(n0 - n2)) = 2 / sqrt(2 * 3).
    assert kendall_tau_b([["x", "y"], ["z"]], [["x"], ["y"], ["z"]]) == pytest.approx(2 / math.sqrt(6))
    # Everything tied: undefined.
    assert kendall_tau_b([["x", "y", "z"]], [["x"], ["y"], ["z"]]) is None


def test_agreement_means() -> None:
    same, reverse = [["a"], ["b"]], [["b"], ["a"]]
    assert item_agreement([same, same, reverse]) == pytest.approx((1 - 1 - 1) / 3)
    assert item_agreement([same]) is None
    tau, multiple = session_agreement({"i1": [same, same], "i2": [same, reverse], "i3": [same]})
    assert tau == 0.0 and multiple == 2
    assert session_agreement({"i": [same]}) == (None, 0)


def answers(*texts: str) -> list[Answer]:
    return [Answer(f"a{i}", i, t) for i, t in enumerate(texts)]


def ranked(*groups: str, unsafe: tuple[str, ...] = (), skipped: bool = False) -> LabelView:
    return LabelView([g.split(",") for g in groups], skipped, list(unsafe))


def test_positions_share_tied_places() -> None:
    assert {k: float(v) for k, v in label_positions([["a"], ["b", "c", "d"], ["e"]]).items()} == {
        "a": 1.0,
        "b": 3.0,
        "c": 3.0,
        "d": 3.0,
        "e": 5.0,
    }


def test_export_rules() -> None:
    four = answers("w", "x", "y", "z")
    # One label, strict: exported as is, responses in generation order.
    assert export_record("p", four, [ranked("a2", "a0", "a3", "a1")]) == {
        "prompt": "p",
        "responses": ["w", "x", "y", "z"],
        "ranking": [2, 0, 3, 1],
    }
    # A tie keeps only its first-generated answer.
    assert export_record("p", four, [ranked("a3", "a2,a1", "a0")])["ranking"] == [2, 1, 0]
    assert export_record("p", four, [ranked("a3", "a2,a1", "a0")])["responses"] == ["w", "x", "z"]
    # Unsafe (flagged in a skip too) goes last, below answers ranked worse.
    record = export_record("p", four, [ranked("a0", "a1", "a2", "a3"), ranked(skipped=True, unsafe=("a0",))])
    assert [record["responses"][i] for i in record["ranking"]] == ["x", "y", "z", "w"]
    # Two labelers merge by mean place: a0 (1, 2) = 1.5 ties a1 (2, 1); a2 3; a3 4.
    record = export_record("p", four, [ranked("a0", "a1", "a2", "a3"), ranked("a1", "a0", "a2", "a3")])
    assert [record["responses"][i] for i in record["ranking"]] == ["w", "y", "z"]
    # All tied, or a single usable answer: nothing to learn.
    assert export_record("p", four, [ranked("a0,a1,a2,a3")]) is None
    assert export_record("p", answers("x", " ", "\n"), [ranked("a0", "a1", "a2")]) is None
    # Chat prompts are exported as messages; the file validates as rankings.
    chat = [{"role": "user", "content": "hi"}]
    lines = [
        export_record(chat, four, [ranked("a0", "a1,a2", "a3")]),
        export_record(chat, answers("p", "q"), [ranked("a1", "a0")]),
    ]
    assert lines[0]["messages"] == chat
    report = validate_jsonl(io.BytesIO(to_jsonl(lines)))
    assert report.ok and report.data_format == "rankings"


def test_check_label() -> None:
    ids = ["a", "b", "c"]
    assert check_label([["a", "b"], ["c"]], ["c", "c"], False, ids) == ([["a", "b"], ["c"]], ["c"])
    assert check_label([], [], True, ids) == ([], [])  # a skip needs no ranking
    for bad in (
        [["a"], ["b"]],
        [["a"], ["a"], ["b", "c"]],
        [["a"], ["b"], ["c"], ["d"]],
        [["a", "b", "c"], []],
    ):
        with pytest.raises(LabelError):
            check_label(bad, [], False, ids)
    with pytest.raises(LabelError):
        check_label([["a"], ["b", "c"]], ["z"], False, ids)


def test_shuffle_is_stable_and_per_labeler() -> None:
    items = list(range(9))
    assert shuffled_for(items, "fbi-1", "key-a") == shuffled_for(items, "fbi-1", "key-a")
    orders = {tuple(shuffled_for(items, "fbi-1", f"key-{n}")) for n in range(20)}
    assert len(orders) > 15 and all(sorted(o) == items for o in orders)
