"""The pure parts of bench/validate.py: the data generator and the cookbook checks, on small data."""

from __future__ import annotations

import io
import json
from pathlib import Path

from tests.bench.loader import load_bench
from tuneforge_api.validation import Limits, validate_jsonl

bench = load_bench("validate.py", "bench_validate")


def test_generator_plants_every_error_where_it_says(tmp_path: Path) -> None:
    gen = bench.generate(tmp_path / "d.jsonl", 1_000_000, seed=3, error_every=20)
    data = gen.path.read_bytes()
    assert data.count(b"\n") == gen.n_lines and len(gen.planted) >= len(bench.PLANTED)
    assert set(gen.planted.values()) >= set(bench.PLANTED) - {"duplicate"} | set(bench.TAIL)
    report = validate_jsonl(io.BytesIO(data), limits=Limits(keep_all_problem_lines=True))
    assert report.problem_lines == set(gen.planted)  # every planted line, and nothing else
    by_line = {p.line: p.code for p in report.problems}
    for line, kind in gen.planted.items():
        if line in by_line:
            assert by_line[line] == (bench.PLANTED.get(kind) or bench.TAIL[kind]), (line, kind)
    again = bench.generate_or_reuse(gen.path, 1_000_000, seed=3)  # same size and seed: reused
    assert again.n_lines == gen.n_lines and gen.path.read_bytes() == data


def test_generated_lines_are_varied_and_unique(tmp_path: Path) -> None:
    gen = bench.generate(tmp_path / "d.jsonl", 300_000, seed=1, error_every=10**9)
    lines = gen.path.read_bytes().splitlines()[:-6]  # without the cut-off tail
    assert len(set(lines)) == len(lines)
    records = [json.loads(x) for x in lines]
    roles = {m["role"] for r in records for m in r["messages"]}
    assert roles == {"system", "developer", "user", "assistant", "tool"}
    assert any(any("weight" in m for m in r["messages"]) for r in records)
    assert any(not x.isascii() for x in map(bytes.decode, lines))


def test_cookbook_checks_as_published() -> None:
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    assert bench.cookbook_format_errors(ok) == []
    assert bench.cookbook_format_errors([1]) == ["data_type"]
    assert bench.cookbook_format_errors({"messages": []}) == ["missing_messages_list"]
    bad = {"messages": [{"role": "bot", "content": "", "x": 1}]}
    assert bench.cookbook_format_errors(bad) == [
        "message_unrecognized_key",
        "unrecognized_role",
        "missing_content",
        "example_missing_assistant_message",
    ]
    tool = {
        "messages": [
            {"role": "tool", "content": "r", "tool_call_id": "c"},
            {"role": "assistant", "content": "a"},
        ]
    }
    assert bench.cookbook_format_errors(tool) == ["message_unrecognized_key", "unrecognized_role"]


def test_cookbook_run_and_superset(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({"messages": [{"role": "user", "content": "q"}]})
        + "\n{broken\n"
        + json.dumps({"messages": "text"})
        + "\n"
        + json.dumps({"messages": [{"role": "tool", "content": "r"}, {"role": "assistant", "content": "a"}]})
        + "\n"
    )
    counts, flagged = bench.run_cookbook(path)
    assert flagged == {1, 2, 3, 4} and counts["(load error)"] == 1 and counts["(raised)"] == 1
    assert bench.superset({1, 2, 3, 4}, flagged, path) == "yes"
    assert bench.superset({1, 2, 3}, flagged, path).startswith("yes, except 1 valid tool")
    assert bench.superset({1, 2}, flagged, path).startswith("NO: 1 lines missed")
    assert bench._line_in("Unexpected format on line 12.") == 12
