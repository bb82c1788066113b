"""Validation of SFT training files: good formats convert, every bad case names its line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tuneforge.storage import FileStorage
from tuneforge_trainer.data import DataError, load_sft_file, parse_sft_lines

CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
CHAT_LINE = json.dumps(CHAT).encode()


def lines(*rows: Any) -> list[bytes]:
    return [r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows]


def problems_of(*rows: Any) -> list[tuple[int | None, str]]:
    with pytest.raises(DataError) as info:
        parse_sft_lines(lines(*rows))
    return [(p.line, p.code) for p in info.value.problems]


def test_chat_file_is_kept_as_messages() -> None:
    system = {"role": "system", "content": "Be brief."}
    data = parse_sft_lines(lines(CHAT, {"messages": [system, *CHAT["messages"]]}))
    assert data.format == "messages"
    assert len(data) == 2
    assert data.records[1]["messages"][0] == system


def test_extra_message_fields_are_dropped() -> None:
    row = {
        "messages": [{"role": "user", "content": "Hi", "name": "ann"}, {"role": "assistant", "content": "Yo"}]
    }
    assert parse_sft_lines(lines(row)).records[0]["messages"][0] == {"role": "user", "content": "Hi"}


def test_prompt_completion_file_keeps_trl_prompt_completion_format() -> None:
    data = parse_sft_lines(lines({"prompt": "2+2=", "completion": "4"}, {"prompt": "", "completion": "x"}))
    assert data.format == "prompt_completion"
    assert data.records == [{"prompt": "2+2=", "completion": "4"}, {"prompt": "", "completion": "x"}]


def test_mixed_file_becomes_messages() -> None:
    data = parse_sft_lines(lines(CHAT, {"prompt": "Q?", "completion": "A."}))
    assert data.format == "messages"
    assert data.records[1] == {
        "messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]
    }


def test_blank_lines_are_skipped_but_line_numbers_stay_physical() -> None:
    assert problems_of(CHAT, b"", b"   ", b"{oops") == [(4, "not_json")]
    assert len(parse_sft_lines(lines(CHAT, b"", CHAT, b""))) == 2


@pytest.mark.parametrize(
    ("row", "code"),
    [
        (b"{not json", "not_json"),
        (b"\xff\xfe", "not_json"),
        ([1, 2], "not_object"),
        ({"text": "hello"}, "missing_messages"),
        ({"messages": []}, "invalid_messages"),
        ({"messages": "hi"}, "invalid_messages"),
        ({"messages": ["hi", {"role": "assistant", "content": "x"}]}, "invalid_message"),
        (
            {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
            "invalid_role",
        ),
        (
            {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]},
            "invalid_content",
        ),
        (
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]},
            "empty_content",
        ),
        ({"messages": [{"role": "user", "content": "Hi"}]}, "missing_assistant_message"),
        ({"prompt": 1, "completion": "x"}, "invalid_prompt"),
        ({"prompt": "x"}, "invalid_completion"),
        ({"prompt": "x", "completion": ""}, "empty_content"),
    ],
)
def test_each_bad_case_has_a_code_and_its_line(row: Any, code: str) -> None:
    assert problems_of(CHAT, row, CHAT) == [(2, code)]


def test_error_message_lists_up_to_20_problems_and_the_total() -> None:
    with pytest.raises(DataError) as info:
        parse_sft_lines([CHAT_LINE] + [b"nope"] * 25)
    err = info.value
    assert err.code == "invalid_training_file"
    assert err.param == "training_file"
    assert err.message.startswith("training file has 25 problems: line 2: not valid JSON (not_json)")
    assert "line 21:" in err.message
    assert "line 22:" not in err.message
    assert err.message.endswith("and 5 more")
    assert err.to_error() == {"code": err.code, "message": err.message, "param": "training_file"}


def test_empty_file_is_an_error() -> None:
    assert problems_of(b"", b"  ") == [(None, "empty_file")]


def test_load_from_storage(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    storage.put_bytes("projects/p/files/f", CHAT_LINE + b"\n" + CHAT_LINE + b"\n")
    assert len(load_sft_file(storage, "projects/p/files/f")) == 2


def test_missing_file_in_storage_is_non_retriable(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_sft_file(FileStorage(tmp_path), "projects/p/files/missing")
    assert [p.code for p in info.value.problems] == ["file_not_found"]


def test_demo_file_is_valid() -> None:
    demo = Path(__file__).resolve().parents[2] / "examples" / "demo_chat.jsonl"
    data = parse_sft_lines(demo.read_bytes().splitlines())
    assert data.format == "messages"
    assert len(data) == 64


def test_openai_chat_features_are_normalised() -> None:
    row = {
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "in Forgeville?"}],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
            {"role": "assistant", "content": "Sunny."},
        ]
    }
    messages = parse_sft_lines(lines(row)).records[0]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert messages[1]["content"] == "Weather in Forgeville?"
    assert messages[2]["tool_calls"][0]["id"] == "c1" and messages[3]["tool_call_id"] == "c1"


def test_untrained_turns_become_prompts_only() -> None:
    """weight 0: the turn is context, never a target; each trained turn is one completion."""
    row = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "bad", "weight": 0},
            {"role": "user", "content": "b"},
            {"role": "assistant", "content": "good", "weight": 1},
        ]
    }
    plain = {"prompt": "q", "completion": "x"}
    data = parse_sft_lines(lines(row, plain))
    assert data.format == "prompt_completion"
    first, second = data.records
    assert [m["content"] for m in first["prompt"]] == ["a", "bad", "b"] and first["completion"][0][
        "content"
    ] == "good"
    assert "weight" not in str(first) and second["completion"][0]["content"] == "x"


@pytest.mark.parametrize(
    ("row", "code"),
    [
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b", "weight": 2},
                ]
            },
            "invalid_weight",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "a", "weight": 0},
                    {"role": "assistant", "content": "b"},
                ]
            },
            "invalid_weight",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b", "weight": 0},
                ]
            },
            "missing_assistant_message",
        ),
    ],
)
def test_bad_weights(row: dict, code: str) -> None:
    with pytest.raises(DataError) as exc:
        parse_sft_lines(lines(row))
    assert [p.code for p in exc.value.problems] == [code]
