"""The dataset validator on its own: a corpus of malformed files with the exact codes and lines
expected, valid files of every format, the fast path against the rules, limits and memory."""

from __future__ import annotations

import io
import json
import random
import tracemalloc
from pathlib import Path

import pytest

from tuneforge_api.validation import Limits, validate_jsonl
from tuneforge_api.validation.report import MAX_PROBLEMS, excerpt
from tuneforge_api.validation.tokens import TokenizerRef, TokenSample, find_tokenizer, load


def j(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode() + b"\n"


def chat(i: int, **extra: object) -> dict:
    return {
        "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
        **extra,
    }


def good(n: int = 2, start: int = 0) -> bytes:
    return b"".join(j(chat(i)) for i in range(start, start + n))


def msgs(*messages: dict) -> bytes:
    return j({"messages": list(messages)})


U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}
CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}

# (name, file, [(line, code), ...]); line None is a problem with the whole file.
CORPUS: list[tuple[str, bytes, list[tuple[int | None, str]]]] = [
    ("truncated last line", good() + b'{"messages": [{"role": "user", "cont', [(3, "not_json")]),
    ("bom not at the start", good(1) + b"\xef\xbb\xbf" + good(1, 5), [(2, "not_json")]),
    ("nul byte after the object", good(1) + good(1, 3)[:-1] + b"\x00\n", [(2, "not_json")]),
    (
        "nul byte inside a string",
        good(1) + b'{"messages": [{"role": "user", "content": "a\x00b"}]}\n',
        [(2, "not_json")],
    ),
    (
        "invalid utf-8",
        good(1) + b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n',
        [(2, "not_utf8")],
    ),
    (
        "json array instead of jsonl",
        b"[" + good(2).replace(b"\n", b",").rstrip(b",") + b"]\n",
        [(1, "not_object")],
    ),
    ("pretty-printed json", b'{\n  "messages": []\n}\n', [(1, "not_json"), (2, "not_json"), (3, "not_json")]),
    ("empty file", b"", [(None, "empty_file")]),
    ("whitespace-only lines", b"\n   \n\t\r\n", [(None, "empty_file")]),
    ("a number per line", good(1) + b"42\n", [(2, "not_object")]),
    ("nan", good(1) + b'{"messages": NaN}\n', [(2, "not_json")]),
    ("huge integer", good(1) + b'{"messages": [], "n": ' + b"9" * 5000 + b"}\n", [(2, "not_json")]),
    (
        "huge float weight",
        good(1) + msgs(U, {**A, "weight": 7}).replace(b"7", b"1e400"),
        [(2, "invalid_weight")],
    ),
    (
        "nesting 10,000 deep",
        good(1) + b'{"messages": ' + b"[" * 10_000 + b"]" * 10_000 + b"}\n",
        [(2, "too_deep")],
    ),
    (
        "nesting 40 deep in metadata",
        good(1) + j({**chat(9), "meta": json.loads('{"a":' * 40 + "1" + "}" * 40)}),
        [(2, "too_deep")],
    ),
    ("no assistant message", good(2) + msgs(U), [(3, "missing_assistant_message")]),
    ("every answer weighted 0", good(1) + msgs(U, {**A, "weight": 0}), [(2, "missing_assistant_message")]),
    ("invalid role", good(1) + msgs({"role": "wizard", "content": "x"}, A), [(2, "invalid_role")]),
    ("role is a number", good(1) + msgs({"role": 1, "content": "x"}, A), [(2, "invalid_role")]),
    ("missing role", good(1) + msgs({"content": "x"}, A), [(2, "missing_field")]),
    ("missing content", good(1) + msgs(U, {"role": "assistant"}), [(2, "missing_field")]),
    ("empty content", good(1) + msgs(U, {"role": "assistant", "content": ""}), [(2, "empty_content")]),
    ("whitespace content", good(1) + msgs({"role": "user", "content": " \n\t"}, A), [(2, "empty_content")]),
    ("content is a number", good(1) + msgs(U, {"role": "assistant", "content": 3}), [(2, "invalid_type")]),
    (
        "content part is an image",
        good(1) + msgs({"role": "user", "content": [{"type": "image_url"}]}, A),
        [(2, "invalid_type")],
    ),
    ("messages is a string", good(1) + j({"messages": "hello"}), [(2, "invalid_type")]),
    ("messages is empty", good(1) + j({"messages": []}), [(2, "missing_field")]),
    ("message is a string", good(1) + msgs("hi", A), [(2, "invalid_type")]),  # type: ignore[arg-type]
    ("unknown message key", good(1) + msgs({**U, "meta": 1}, A), [(2, "unknown_key")]),
    ("name is not a string", good(1) + msgs({**U, "name": 5}, A), [(2, "invalid_type")]),
    ("weight 2", good(1) + msgs(U, {**A, "weight": 2}), [(2, "invalid_weight")]),
    ("weight true", good(1) + msgs(U, {**A, "weight": True}), [(2, "invalid_weight")]),
    ("weight on a user message", good(1) + msgs({**U, "weight": 1}, A), [(2, "invalid_weight")]),
    (
        "tool call without id",
        good(1) + msgs(U, {"role": "assistant", "tool_calls": [{**CALL, "id": ""}]}, A),
        [(2, "invalid_tool_call")],
    ),
    (
        "tool call without function",
        good(1) + msgs(U, {"role": "assistant", "tool_calls": [{"id": "c1"}]}, A),
        [(2, "invalid_tool_call")],
    ),
    (
        "tool arguments not a string",
        good(1)
        + msgs(
            U, {"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "f", "arguments": {}}}]}, A
        ),
        [(2, "invalid_tool_call")],
    ),
    (
        "tool calls on a user message",
        good(1) + msgs({**U, "tool_calls": [CALL]}, A),
        [(2, "invalid_tool_call")],
    ),
    (
        "tool result without id",
        good(1) + msgs(U, {"role": "assistant", "tool_calls": [CALL]}, {"role": "tool", "content": "1"}, A),
        [(2, "missing_field")],
    ),
    (
        "tool result for no call",
        good(1) + msgs(U, {"role": "tool", "tool_call_id": "zz", "content": "1"}, A),
        [(2, "invalid_tool_call")],
    ),
    (
        # The fast path once skipped the blank check when another message had no text.
        "blank question beside a tool call",
        good(1)
        + msgs(
            {"role": "user", "content": "   "},
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": CALL["id"], "content": "1"},
            A,
        ),
        [(2, "empty_content")],
    ),
    (
        # msgspec reads a block as a stream of values: these two lines are two values together,
        # but neither line is valid JSON alone.
        "one example split over two lines",
        good(1)
        + good(1, start=5).rstrip(b"\n")
        + b' {"messages": [{"role": "user", "content": "x"},\n{"role": "assistant", "content": "y"}]}\n',
        [(2, "not_json"), (3, "not_json")],
    ),
    ("the same example repeated", good(2) + good(1), [(3, "duplicate_example")]),
    ("unknown format", good(1) + j({"text": "hello"}), [(2, "unknown_format")]),
    (
        "a pair in a chat file",
        good(2) + j({"prompt": "p", "chosen": "a", "rejected": "b"}),
        [(3, "mixed_formats")],
    ),
    (
        "a prompt/completion in a chat file",
        good(2) + j({"prompt": "p", "completion": "c"}),
        [(3, "mixed_formats")],
    ),
    ("too long line", good(1) + j(chat(7, pad="x" * 150_000)) + good(1, 9), [(2, "too_long")]),
    (
        "pair without rejected",
        j({"prompt": "p", "chosen": "a", "rejected": "b"}) + j({"prompt": "q", "chosen": "a"}),
        [(2, "missing_field")],
    ),
    (
        "pair with empty chosen",
        j({"prompt": "p", "chosen": "a", "rejected": "b"})
        + j({"prompt": "q", "chosen": " ", "rejected": "b"}),
        [(2, "empty_content")],
    ),
    (
        "pair answered by a user",
        j({"prompt": "p", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}),
        [(1, "invalid_role")],
    ),
    ("pair without prompt", j({"chosen": "a", "rejected": "b"}), [(1, "missing_field")]),
    (
        "ranking with duplicates",
        j({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 0, 1]}),
        [(1, "invalid_ranking")],
    ),
    (
        "ranking out of range",
        j({"prompt": "p", "responses": ["a", "b"], "ranking": [1, 2]}),
        [(1, "invalid_ranking")],
    ),
    (
        "ranking of booleans",
        j({"prompt": "p", "responses": ["a", "b"], "ranking": [True, False]}),
        [(1, "invalid_ranking")],
    ),
    (
        "ranking of one response",
        j({"prompt": "p", "responses": ["a"], "ranking": [0]}),
        [(1, "too_few_responses")],
    ),
    (
        "empty completion",
        j({"prompt": "p", "completion": "c"}) + j({"prompt": "p2", "completion": ""}),
        [(2, "empty_content")],
    ),
    (
        "prompt not a string",
        j({"prompt": "p", "completion": "c"}) + j({"prompt": 1, "completion": "d"}),
        [(2, "invalid_type")],
    ),
    (
        "completion missing",
        j({"prompt": "p", "completion": "c"}) * 1
        + j({"prompt": "p2", "completion": "d"})
        + j({"prompt": "p3"}),
        [(3, "missing_field")],
    ),
    (
        "an answer in an RLHF prompts file",
        j({"prompt": "a"}) + j({"prompt": "b"}) + msgs(U, A),
        [(3, "mixed_formats")],
    ),
    (
        "chat lines in a pairs file",
        j({"prompt": "p", "chosen": "a", "rejected": "b"}) * 1
        + j({"prompt": "q", "chosen": "a", "rejected": "b"})
        + good(1),
        [(3, "missing_field")],
    ),
]

VALID: list[tuple[str, bytes, str]] = [
    ("chat", good(3), "chat"),
    ("bom at the start", b"\xef\xbb\xbf" + good(2), "chat"),
    ("crlf line endings", good(3).replace(b"\n", b"\r\n"), "chat"),
    ("blank lines between", good(1) + b"\n\n" + good(1, 4), "chat"),
    ("no final newline", good(2).rstrip(b"\n"), "chat"),
    (
        "system, developer, tools, weights, content parts",
        msgs(
            {"role": "system", "content": "s"},
            {"role": "developer", "content": "d"},
            {"role": "user", "content": [{"type": "text", "text": "what is 1+1?"}], "name": "bob"},
            {"role": "assistant", "tool_calls": [CALL], "content": None, "weight": 0},
            {"role": "tool", "tool_call_id": "c1", "content": "2"},
            {"role": "assistant", "content": "2", "weight": 1},
        )
        + good(1),
        "chat",
    ),
    ("chat ending with a user turn", msgs(U, A, U) + good(1), "chat"),
    (
        "prompt/completion",
        j({"prompt": "p", "completion": "c"}) + j({"prompt": "", "completion": "d"}),
        "prompt_completion",
    ),
    (
        "preference pairs",
        j({"prompt": "p", "chosen": "a", "rejected": "b"})
        + j({"messages": [U], "chosen": [A], "rejected": "no"}),
        "preference",
    ),
    (
        "rankings and pairs",
        j({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]})
        + j({"prompt": "q", "chosen": "a", "rejected": "b"}),
        "rankings",
    ),
    (
        "rlhf prompts",
        j({"prompt": "p"}) + msgs({"role": "system", "content": "s"}, U) + msgs(U, A, U),
        "prompts",
    ),
]


def run(data: bytes, *, fast: bool = True, limits: Limits | None = None, sample: TokenSample | None = None):
    limits = limits or Limits(max_line_bytes=100_000, keep_all_problem_lines=True)
    return validate_jsonl(io.BytesIO(data), limits=limits, use_fast_path=fast, sample=sample)


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "rules-only"])
@pytest.mark.parametrize(("name", "data", "expected"), CORPUS, ids=[c[0] for c in CORPUS])
def test_malformed_corpus(name: str, data: bytes, expected: list, fast: bool) -> None:
    assert len(CORPUS) >= 30
    report = run(data, fast=fast)
    assert [(p.line, p.code) for p in report.problems] == expected, [str(p) for p in report.problems]
    assert report.n_problems == len(expected) and not report.ok
    assert all(len(p.excerpt) <= 80 for p in report.problems)


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "rules-only"])
@pytest.mark.parametrize(("name", "data", "fmt"), VALID, ids=[v[0] for v in VALID])
def test_valid_files(name: str, data: bytes, fmt: str, fast: bool) -> None:
    report = run(data, fast=fast)
    assert report.ok, [str(p) for p in report.problems]
    assert report.data_format == fmt and report.n_examples == len([x for x in data.splitlines() if x.strip()])


def test_first_100_problems_kept_all_counted_in_line_order() -> None:
    data = good(1) + b"".join(msgs({"role": "x", "content": str(i)}, A) for i in range(250)) + msgs(U)
    report = run(data)
    assert report.n_problems == 251 and len(report.problems) == MAX_PROBLEMS
    assert [p.line for p in report.problems] == list(range(2, 102))
    assert report.codes == {"invalid_role": 250, "missing_assistant_message": 1}
    assert report.to_json()["problem_counts"] == report.codes


def test_excerpt_is_short_and_on_one_line() -> None:
    assert excerpt("a\nb" * 100).count("\n") == 0 and len(excerpt("x" * 500)) == 80
    assert excerpt({"k": "v"}) == '{"k": "v"}' and excerpt(b"caf\xe9") == "caf\ufffd"


def random_file(seed: int, n: int = 400) -> bytes:
    """Mostly plain chat (the fast path), with problems and other shapes mixed in."""
    rng = random.Random(seed)
    odd = [
        msgs(U),
        msgs({"role": "bot", "content": "x"}, A),
        msgs(U, {**A, "content": "  "}),
        msgs(U, {**A, "weight": 0}, U),
        msgs({**U, "weight": 1}, A),
        b"{oops\n",
        b"\n",
        j({"prompt": "p", "completion": "c"}),
        msgs(
            U,
            {"role": "assistant", "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "c1", "content": "r"},
            A,
        ),
        "ü".encode() + b"\n",
    ]
    lines = []
    for i in range(n):
        if rng.random() < 0.05:
            lines.append(rng.choice(odd))
        elif rng.random() < 0.02 and lines:
            lines.append(rng.choice(lines))
        else:
            content = "é" * rng.randint(0, 3) + "x" * rng.randint(1, 50)
            lines.append(
                msgs({"role": "user", "content": f"{i} {content}"}, {**A, "weight": rng.choice([0, 1])}, A)
            )
    return b"".join(lines)


@pytest.mark.parametrize("seed", range(6))
def test_fast_path_agrees_with_the_rules(seed: int) -> None:
    data = random_file(seed)
    limits = Limits(block_bytes=4096, keep_all_problem_lines=True)
    fast = validate_jsonl(io.BytesIO(data), limits=limits)
    slow = validate_jsonl(io.BytesIO(data), limits=limits, use_fast_path=False)
    assert fast.to_json() == slow.to_json()
    assert fast.problem_lines == slow.problem_lines and fast.profile.to_json() == slow.profile.to_json()


def test_fast_path_is_taken_for_plain_chat() -> None:
    from tuneforge_api.validation import scan

    validator = scan.Validator(limits=Limits(block_bytes=4096))
    validator.feed(io.BytesIO(good(500)))
    assert validator.fast_lines == 500


def test_a_20_mb_line_is_never_held_in_memory() -> None:
    data = (
        good(1) + b'{"messages": [{"role": "user", "content": "' + b"x" * (20 << 20) + b'"}]}\n' + good(1, 5)
    )
    stream = io.BytesIO(data)
    del data
    tracemalloc.start()
    report = validate_jsonl(stream, limits=Limits(max_line_bytes=1 << 20, block_bytes=64 << 10))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [(p.line, p.code) for p in report.problems] == [(2, "too_long")] and report.n_lines == 3
    assert peak < 4 << 20, peak


def test_deep_nesting_costs_no_recursion() -> None:
    line = b'{"messages": ' + b"[{" * 200_000 + b"}]" * 200_000 + b"}\n"
    report = run(good(1) + line, limits=Limits(max_line_bytes=1 << 20))
    assert [(p.line, p.code) for p in report.problems] == [(2, "too_deep")]


def test_dedupe_memory_is_capped() -> None:
    data = good(3) + good(1) + good(1, 2)  # line 4 repeats line 1 (remembered), line 5 repeats line 3 (not)
    report = run(data, limits=Limits(dedupe_cap=2, keep_all_problem_lines=True), fast=False)
    assert [(p.line, p.code) for p in report.problems] == [(4, "duplicate_example")]
    assert report.stats["duplicates_checked"] == 2


def test_estimated_token_stats_are_bytes_over_4() -> None:
    data = msgs({"role": "user", "content": "x" * 40}, {"role": "assistant", "content": "y" * 80})
    stats = run(data).stats
    # The line's bytes / 4 (the JSON around the text stands in for the chat template);
    # trained: the answer's 80 bytes / 4 + 1 end-of-turn token.
    n = round(len(data.strip()) / 4)
    assert stats["tokens_per_example"] == {
        "min": n,
        "mean": round(len(data.strip()) / 4, 1),
        "p95": n,
        "max": n,
    }
    assert stats["trained_tokens"] == 21 and stats["estimated"] is True and stats["method"] == "bytes/4"
    assert stats["max_seq_length"] == 1024 and stats["n_over_max_seq_length"] == 0


def make_tokenizer(folder: Path, max_positions: int = 64) -> TokenizerRef:
    """A word-level tokenizer in an HF model folder: one token per word, easy to count."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(["alpha beta gamma"], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text(json.dumps({"max_position_embeddings": max_positions}))
    ref = find_tokenizer("org/words", folder, folder)
    assert ref is not None and ref.max_seq_length == max_positions
    return ref


def test_exact_token_stats_with_a_tokenizer(tmp_path: Path) -> None:
    ref = make_tokenizer(tmp_path / "org--words")
    data = msgs({"role": "user", "content": "alpha beta"}, {"role": "assistant", "content": "gamma " * 70})
    data += msgs({"role": "user", "content": "beta"}, {"role": "assistant", "content": "alpha"})
    stats = run(data, sample=TokenSample(load(ref), ref, stride=1)).stats
    # Words plus 4 template tokens per message; answers plus 1 end token.
    assert (
        stats["tokens_per_example"]["max"] == 2 + 70 + 8 and stats["tokens_per_example"]["min"] == 1 + 1 + 8
    )
    assert stats["trained_tokens"] == 71 + 2 and stats["n_over_max_seq_length"] == 1
    assert stats["estimated"] is False and stats["method"] == "exact" and stats["tokenizer"] == "org/words"


def test_calibrated_token_stats_from_a_sample(tmp_path: Path) -> None:
    ref = make_tokenizer(tmp_path / "org--words")
    data = b"".join(
        msgs({"role": "user", "content": f"alpha {i}"}, {"role": "assistant", "content": "beta"})
        for i in range(40)
    )
    stats = run(data, sample=TokenSample(load(ref), ref, stride=4)).stats
    assert stats["estimated"] is True and stats["method"] == "calibrated" and stats["sampled_examples"] == 10
    assert 10 <= stats["tokens_per_example"]["mean"] <= 12
