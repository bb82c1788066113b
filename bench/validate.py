"""Dataset-validation benchmark (not a test): lines/s on a ~1 GB chat JSONL, side by side with two
published peer validators, on the same file.

1. Tuneforge's validator: ``tuneforge_api.validation.validate_jsonl``, the code the API runs on an
   upload (the C line scanner, msgspec for the lines it is unsure of, the rules for the lines
   neither proves valid), as the API runs it, in one process, without the C scanner, and on a
   worker pool.
2. The format checks of the OpenAI cookbook notebook "Data preparation and analysis for chat model
   fine-tuning" (examples/Chat_finetuning_data_prep.ipynb in openai/openai-cookbook), re-implemented
   below as published.
3. ``check_file`` of the ``together`` package, run by a Python that has it installed (by default a
   private venv, bench/out/together-venv; it is not installed into the project venv because it pins
   rich<15, which the project's constraints do not allow). Skipped, with the reason, if absent.

The file mixes realistic chat data (system prompts, 1-6 turns, code, non-ASCII text, tool calls,
per-message weights, the developer role) with a sprinkling of errors through the file. The damage
that stops a JSON parser (truncated and non-object lines) sits at the end of the file, as when an
export is cut short: the cookbook cannot load such a line and ``check_file`` stops at the first one,
so this placement lets both cover the whole file. For the same reason the file holds no invalid
UTF-8: ``check_file``'s UTF-8 pre-pass would stop there and skip its JSON pass.

Printed per validator: lines/s, findings by category, and whether Tuneforge flags every line the
peer flags (a superset). Target (issue 5): at least 5x the faster peer.
Usage: python bench/validate.py [--size-mb 1024] [--repeat 2] [--write]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
RESULTS = Path(__file__).with_name("RESULTS.md")
TOGETHER_VENV = OUT / "together-venv"
GENERATOR_VERSION = 1

# -- the data --------------------------------------------------------------------------------

WORDS = (
    "the model answer question data train loss token batch learning rate epoch adapter layer "
    "weight gradient python function value return error file line format check system user "
    "please explain why how what when where could would should simple example result output "
    "input number string list dict class method call test run fast slow memory disk network "
    "request response server client service queue worker job status event metric log trace"
).split()
UNICODE = ["café", "naïve", "Größe", "東京", "数据集", "모델", "Привет", "مرحبا", "🙂", "🚀", "œuvre", "ß"]
SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in at most three sentences.",
    "You are a senior Python engineer who reviews code carefully.",
    "You answer customer questions about an online shop politely.",
    "Tu es un assistant qui répond en français.",
    "You are a math tutor; show your reasoning step by step.",
]
# One category per planted error; each maps to the Tuneforge code expected on its line.
PLANTED = {
    "no_assistant": "missing_assistant_message",
    "bad_role": "invalid_role",
    "empty_content": "empty_content",
    "blank_content": "empty_content",
    "missing_content": "missing_field",
    "unknown_key": "unknown_key",
    "bad_weight": "invalid_weight",
    "number_content": "invalid_type",
    "messages_not_list": "invalid_type",
    "empty_messages": "missing_field",
    "legacy_function_role": "invalid_role",
    "tool_call_without_id": "invalid_tool_call",
    "too_deep": "too_deep",
    "duplicate": "duplicate_example",
}
TAIL = {"truncated": "not_json", "not_object": "not_object"}


def _sentence(rng: random.Random, n: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n)]
    if rng.random() < 0.15:
        words.insert(rng.randrange(len(words) + 1), rng.choice(UNICODE))
    return " ".join(words).capitalize() + rng.choice([".", "?", "!", "."])


def _text(rng: random.Random, mean_words: int) -> str:
    n = max(3, int(rng.lognormvariate(0, 0.6) * mean_words))
    parts = []
    while n > 0:
        k = min(n, rng.randint(6, 20))
        parts.append(_sentence(rng, k))
        n -= k
    text = " ".join(parts)
    if rng.random() < 0.08:
        text += '\n\n```python\ndef f(x):\n    return {"x": x, "path": "C:\\\\tmp"}\n```\n'
    return text


def make_example(rng: random.Random, i: int) -> dict:
    """One valid chat example; ``i`` makes it unique."""
    messages: list[dict] = []
    if rng.random() < 0.6:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    elif rng.random() < 0.05:
        messages.append({"role": "developer", "content": "Follow the style guide."})
    turns = rng.choices([1, 2, 3, 4, 6], weights=[50, 25, 12, 8, 5])[0]
    for t in range(turns):
        messages.append({"role": "user", "content": f"[{i}.{t}] " + _text(rng, 25)})
        if rng.random() < 0.05:
            call_id = f"call_{i}_{t}"
            args = json.dumps({"query": rng.choice(WORDS), "limit": rng.randint(1, 9)})
            call = {"id": call_id, "type": "function", "function": {"name": "search", "arguments": args}}
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            messages.append({"role": "tool", "tool_call_id": call_id, "content": _text(rng, 15)})
        answer = {"role": "assistant", "content": _text(rng, 90)}
        if turns > 1 and rng.random() < 0.1:
            answer["weight"] = 0 if t < turns - 1 else 1
        messages.append(answer)
    return {"messages": messages}


def make_error(rng: random.Random, i: int, kind: str) -> dict | str:
    ex = make_example(rng, i)
    msgs = ex["messages"]
    last = msgs[-1]
    if kind == "no_assistant":
        ex["messages"] = [m for m in msgs if m["role"] in ("system", "user")]
    elif kind == "bad_role":
        last["role"] = "bot"
    elif kind == "empty_content":
        last["content"] = ""
    elif kind == "blank_content":
        last["content"] = "   \n "
    elif kind == "missing_content":
        del last["content"]
    elif kind == "unknown_key":
        last["metadata"] = {"source": "crawl"}
    elif kind == "bad_weight":
        last["weight"] = 2
    elif kind == "number_content":
        last["content"] = 42
    elif kind == "messages_not_list":
        ex["messages"] = "user: hi / assistant: hello"
    elif kind == "empty_messages":
        ex["messages"] = []
    elif kind == "legacy_function_role":
        msgs.insert(-1, {"role": "function", "name": "lookup", "content": "42"})
    elif kind == "tool_call_without_id":
        call = {"type": "function", "function": {"name": "search", "arguments": "{}"}}
        msgs.insert(-1, {"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "too_deep":
        nested: object = "x"
        for _ in range(40):
            nested = {"a": nested}
        ex["meta"] = nested
    return ex


@dataclass
class Generated:
    path: Path
    n_lines: int
    planted: dict[int, str] = field(default_factory=dict)  # line -> category


def generate(path: Path, target_bytes: int, *, seed: int = 0, error_every: int = 2000) -> Generated:
    """Write the benchmark file; returns where each error was planted."""
    rng = random.Random(seed)
    planted: dict[int, str] = {}
    kinds = sorted(PLANTED)
    written = 0
    line = 0
    kept: list[str] = []  # a few earlier lines, to repeat as duplicates
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        while written < target_bytes:
            line += 1
            if line % error_every == 0:
                kind = kinds[(line // error_every) % len(kinds)]
                planted[line] = kind
                text = rng.choice(kept) if kind == "duplicate" and kept else None
                if text is None:
                    planted[line] = kind if kind != "duplicate" else "no_assistant"
                    value = make_error(rng, line, planted[line])
                    text = json.dumps(value, ensure_ascii=False)
            else:
                text = json.dumps(make_example(rng, line), ensure_ascii=False)
                if len(kept) < 64 and rng.random() < 0.01:
                    kept.append(text)
            fh.write(text + "\n")
            written += len(text.encode()) + 1
        for kind in list(TAIL) * 3:  # the cut-off tail
            line += 1
            planted[line] = kind
            text = json.dumps(make_example(rng, line), ensure_ascii=False)
            fh.write((text[: len(text) // 2] if kind == "truncated" else f"[{text}]") + "\n")
    os.replace(tmp, path)
    meta = {
        "version": GENERATOR_VERSION,
        "seed": seed,
        "bytes": target_bytes,
        "lines": line,
        "planted": planted,
    }
    path.with_suffix(".meta.json").write_text(json.dumps(meta))
    return Generated(path, line, planted)


def generate_or_reuse(path: Path, target_bytes: int, seed: int = 0) -> Generated:
    meta_path = path.with_suffix(".meta.json")
    if path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if (
            meta.get("version") == GENERATOR_VERSION
            and meta["bytes"] == target_bytes
            and meta["seed"] == seed
        ):
            return Generated(path, meta["lines"], {int(k): v for k, v in meta["planted"].items()})
    return generate(path, target_bytes, seed=seed)


# -- peer 1: the OpenAI cookbook's format checks -------------------------------------------------


def cookbook_format_errors(ex: object) -> list[str]:
    """The categories the cookbook's "Format error checks" loop counts for one example.

    Source: openai/openai-cookbook, examples/Chat_finetuning_data_prep.ipynb, section "Format
    validation" (https://cookbook.openai.com/examples/chat_finetuning_data_prep). The loop body is
    kept as published, except that it returns the categories instead of incrementing a shared
    ``format_errors`` dict; like the notebook, it can raise on some malformed examples.
    """
    errors: list[str] = []
    if not isinstance(ex, dict):
        errors.append("data_type")
        return errors
    messages = ex.get("messages", None)
    if not messages:
        errors.append("missing_messages_list")
        return errors
    for message in messages:
        if "role" not in message or "content" not in message:
            errors.append("message_missing_key")
        if any(k not in ("role", "content", "name", "function_call", "weight") for k in message):
            errors.append("message_unrecognized_key")
        if message.get("role", None) not in ("system", "user", "assistant", "function"):
            errors.append("unrecognized_role")
        content = message.get("content", None)
        function_call = message.get("function_call", None)
        if (not content and not function_call) or not isinstance(content, str):
            errors.append("missing_content")
    if not any(message.get("role", None) == "assistant" for message in messages):
        errors.append("example_missing_assistant_message")
    return errors


def run_cookbook(path: Path) -> tuple[Counter, set[int]]:
    """The notebook loads every line with ``json.loads`` and then runs the loop; here each line is
    loaded and checked in turn (the same work, without holding 1 GB of objects). Two additions,
    labelled: a line ``json.loads`` rejects, where the notebook's loader would stop, is counted
    as ``(load error)``; an example on which the loop raises is counted as ``(raised)``."""
    counts: Counter = Counter()
    flagged: set[int] = set()
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            try:
                ex = json.loads(line)
            except ValueError:
                counts["(load error)"] += 1
                flagged.add(number)
                continue
            try:
                found = cookbook_format_errors(ex)
            except Exception:  # noqa: BLE001 - the notebook would stop here
                found = ["(raised)"]
            if found:
                counts.update(found)
                flagged.add(number)
    return counts, flagged


# -- peer 2: together's check_file ---------------------------------------------------------------

_TOGETHER_SNIPPET = """
import json, sys, time
from together.lib.utils.files import check_file
t = time.perf_counter()
report = check_file(sys.argv[1])
report["_seconds"] = time.perf_counter() - t
print(json.dumps(report, default=str))
"""


def together_python() -> tuple[str | None, str]:
    """A Python with ``together`` installed, or None and why not."""
    candidates = [sys.executable, str(TOGETHER_VENV / "bin" / "python")]
    for python in candidates:
        if not Path(python).exists():
            continue
        probe = subprocess.run(
            [
                python,
                "-c",
                "import together.lib.utils.files as f; import together; print(together.__version__)",
            ],
            capture_output=True,
            text=True,
        )
        if probe.returncode == 0:
            return python, probe.stdout.strip()
    return None, (
        f"together is not installed; create it with: python -m venv {TOGETHER_VENV.relative_to(ROOT)} && "
        f"{(TOGETHER_VENV / 'bin' / 'pip').relative_to(ROOT)} install together"
    )


def run_together(python: str, path: Path) -> dict:
    done = subprocess.run([python, "-c", _TOGETHER_SNIPPET, str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout)


# -- Tuneforge -----------------------------------------------------------------------------------


def run_tuneforge(path: Path, workers: int | None = None, native: bool = True, keep_all: bool = False):
    """As the API calls it (routes/files.py, validation/service.py) with ``workers=None``: in this
    process where the C line scanner is built, else on one worker process per CPU, which read the
    file themselves. ``workers`` names a pool size (0: none); ``native=False`` turns the C scanner
    off (in this process: keep workers=0 with it, worker processes would still use it).
    ``keep_all`` lists every problem's line (``Report.problem_lines``), as the API does not: the
    superset check needs them, so one untimed run keeps them."""
    from tuneforge_api.validation import Limits, fast, validate_jsonl

    limits = Limits(keep_all_problem_lines=keep_all, workers=workers)
    was, fast.NATIVE = fast.NATIVE, native and fast.NATIVE
    try:
        with open(path, "rb") as fh:
            return validate_jsonl(fh, limits=limits, size_hint=path.stat().st_size)
    finally:
        fast.NATIVE = was


def c_scanner() -> bool:
    from tuneforge_api.validation import fast

    return fast.NATIVE


def available_cpus() -> int:
    from tuneforge_api.validation.parallel import available_cpus

    return available_cpus()


def tuneforge_workers() -> int:
    """What ``workers=None`` picks on this machine."""
    from tuneforge_api.validation.parallel import auto_workers

    return auto_workers()


# -- the table -------------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    seconds: float
    lines: int
    findings: str
    superset: str

    @property
    def rate(self) -> float:
        return self.lines / self.seconds if self.seconds else 0.0


def best_of(repeat: int, fn):
    best, result = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def superset(ours: set[int], theirs: set[int], path: Path) -> str:
    """Whether every line the peer flags, we flag; peer-only lines that are valid in today's
    OpenAI format (tool calls, the tool and developer roles) are listed apart."""
    missed = sorted(theirs - ours)
    if not missed:
        return "yes"
    legacy, other = 0, []
    wanted = set(missed)
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, start=1):
            if number in wanted:
                if any(k in line for k in (b'"tool_calls"', b'"role": "tool"', b'"role": "developer"')):
                    legacy += 1
                else:
                    other.append(number)
    text = (
        f"yes, except {legacy} valid tool/developer lines the peer's older schema rejects" if legacy else ""
    )
    return text if not other else f"NO: {len(other)} lines missed, e.g. {other[:5]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="size of the generated file")
    parser.add_argument("--repeat", type=int, default=2, help="runs per validator; the best counts")
    parser.add_argument("--write", action="store_true", help=f"append the table to {RESULTS.name}")
    args = parser.parse_args(argv)

    path = OUT / f"validate-{args.size_mb}mb.jsonl"
    t = time.perf_counter()
    gen = generate_or_reuse(path, args.size_mb * 1024 * 1024)
    print(
        f"data: {path} ({path.stat().st_size / 1e6:.0f} MB, {gen.n_lines} lines, {len(gen.planted)} planted)"
        f" in {time.perf_counter() - t:.0f} s"
    )

    rows: list[Row] = []
    workers = tuneforge_workers()
    seconds, report = best_of(args.repeat, lambda: run_tuneforge(path))
    every_line = run_tuneforge(path, keep_all=True)  # untimed: the API does not keep them all
    assert every_line.to_json() == report.to_json(), "keeping every problem line changed the report"
    ours = set(every_line.problem_lines)
    codes = Counter(p.code for p in report.problems) if report.n_problems <= 100 else report.codes
    expected = {line: PLANTED.get(k) or TAIL[k] for line, k in gen.planted.items()}
    wrong = {line for line, code in expected.items() if line not in ours}
    rows.append(
        Row(
            f"Tuneforge (default: {'C scanner' if c_scanner() else 'no C scanner'}, "
            f"{workers or 'no'} worker processes)",
            seconds,
            gen.n_lines,
            _fmt(codes),
            f"finds all {len(expected)} planted: "
            + ("yes" if not wrong else f"NO, missed {sorted(wrong)[:5]}"),
        )
    )

    seconds, single = best_of(args.repeat, lambda: run_tuneforge(path, workers=0))
    assert single.to_json() == report.to_json(), "the single-process report differs"
    rows.append(Row("Tuneforge, 1 process", seconds, gen.n_lines, "same report", "same report"))
    if c_scanner():
        seconds, decoded = best_of(args.repeat, lambda: run_tuneforge(path, workers=0, native=False))
        assert decoded.to_json() == report.to_json(), "the report without the C scanner differs"
        name = "Tuneforge, 1 process, without the C scanner (msgspec decodes every line)"
        rows.append(Row(name, seconds, gen.n_lines, "same report", "same report"))
    cpus = available_cpus()
    seconds, pooled = best_of(args.repeat, lambda: run_tuneforge(path, workers=cpus))
    assert pooled.to_json() == report.to_json(), "the worker-pool report differs"
    rows.append(
        Row(f"Tuneforge, {cpus} worker processes", seconds, gen.n_lines, "same report", "same report")
    )

    seconds, (counts, flagged) = best_of(args.repeat, lambda: run_cookbook(path))
    rows.append(
        Row("OpenAI cookbook checks", seconds, gen.n_lines, _fmt(counts), superset(ours, flagged, path))
    )

    python, why = together_python()
    if python is None:
        print(f"together: skipped: {why}")
    else:
        seconds, result = best_of(args.repeat, lambda: run_together(python, path))
        stop = result.get("line_number") or _line_in(result.get("message", ""))
        covered = stop or gen.n_lines
        found = f"stops at line {stop}: {result.get('message', '')[:60]}" if stop else "passed"
        check = superset(ours, {stop} if stop else set(), path)
        rows.append(Row(f"together check_file ({why})", result["_seconds"], covered, found, check))

    peers = [r.rate for r in rows if not r.name.startswith("Tuneforge")]
    ratio = rows[0].rate / max(peers) if peers else float("nan")
    head = "| validator | lines/s | seconds | findings | superset of the peer's findings |"
    lines = [head, "|---|---:|---:|---|---|"]
    lines += [f"| {r.name} | {r.rate:,.0f} | {r.seconds:.1f} | {r.findings} | {r.superset} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    print(f"\nTuneforge / fastest peer: {ratio:.1f}x (target 5x)")
    if args.write:
        machine = f"{platform.node()} ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with open(RESULTS, "a") as fh:
            fh.write(
                f"\n## Dataset validation ({stamp})\n\n"
                f"Machine: {machine}, Python {platform.python_version()}. "
                f"File: {path.stat().st_size / 1e6:.0f} MB, {gen.n_lines:,} lines of chat JSONL with "
                f"{len(gen.planted)} planted errors (`python bench/validate.py`). "
                f"Best of {args.repeat} runs.\n\n"
                f"{table}\n\nTuneforge / fastest peer: {ratio:.1f}x (target: 5x).\n"
            )
        print(f"appended to {RESULTS.relative_to(ROOT)}")
    return 0


def _line_in(message: str) -> int | None:
    """check_file names the line of a JSON error only in its message ("... on line 12.")."""
    found = re.search(r"line (\d+)", message)
    return int(found.group(1)) if found else None


def _fmt(counts: dict) -> str:
    return ", ".join(f"{k}: {v:,}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) or "none"


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
