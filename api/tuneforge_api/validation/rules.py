"""The rules for one record (one parsed line), by format. This is the reference path: it names
every problem precisely. ``fast.py`` only proves common chat lines valid faster, and defers
to these rules whenever it is unsure.

A record gets one *kind*; the file's format is decided from the kinds of all its lines (see
``formats.py``), because some lines fit two formats: ``{"messages": [user]}`` is an RLHF
prompt, or a chat example that lacks its answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})
MESSAGE_KEYS = frozenset({"role", "content", "name", "weight", "tool_calls", "tool_call_id"})
# Size units (see report.py) for what a chat template adds around each message: ~4 tokens,
# and ~1 trained token (the end-of-turn marker) after each trained answer.
MESSAGE_OVERHEAD = 16
TRAINED_OVERHEAD = 4

# Kinds of line.
CHAT = "chat"  # messages ending with a trained assistant turn
CHAT_OR_PROMPT = "chat_or_prompt"  # messages with a trained assistant turn, ending with another role
PROMPT_MESSAGES = "prompt_messages"  # messages without an assistant turn
PROMPT_TEXT = "prompt_text"  # {"prompt": str | messages} alone
PROMPT_COMPLETION = "prompt_completion"
PAIR = "pair"
RANKING = "ranking"


class Invalid(Exception):
    """One problem with a record: the first one found (one problem per line)."""

    def __init__(self, code: str, message: str, value: Any = "") -> None:
        super().__init__(message)
        self.code, self.message, self.value = code, message, value


@dataclass
class Measure:
    """The texts of an example (with whether each is trained) and its template allowance."""

    texts: list[tuple[str, bool]] = field(default_factory=list)
    overhead: int = 0
    trained_overhead: int = 0

    def sizes(self) -> tuple[int, int]:
        size, trained = self.overhead, self.trained_overhead
        for text, is_trained in self.texts:
            n = text_bytes(text)
            size += n
            if is_trained:
                trained += n
        return size, trained


def text_bytes(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_record(record: dict[str, Any]) -> tuple[str, Measure]:
    """The kind of a parsed line and its measure; raises ``Invalid``."""
    if "responses" in record or "ranking" in record:
        return RANKING, _check_ranking(record)
    if "chosen" in record or "rejected" in record:
        return PAIR, _check_pair(record)
    if "completion" in record:
        return PROMPT_COMPLETION, _check_prompt_completion(record)
    if "messages" in record:
        measure = Measure()
        trained, last_role = _check_messages(record["messages"], "messages", measure)
        if trained:
            return (CHAT if last_role == "assistant" else CHAT_OR_PROMPT), measure
        return PROMPT_MESSAGES, measure
    if "prompt" in record:
        measure = Measure()
        _check_prompt(record, measure)
        return PROMPT_TEXT, measure
    raise Invalid(
        "unknown_format",
        "expected 'messages', 'prompt' and 'completion', 'chosen' and 'rejected', "
        "or 'responses' and 'ranking'",
        sorted(record)[:8],
    )


def _check_messages(messages: Any, where: str, measure: Measure) -> tuple[bool, str | None]:
    """Check a message list; returns (has a trained assistant message, role of the last one)."""
    if not isinstance(messages, list):
        raise Invalid("invalid_type", f"'{where}' must be a list of messages", messages)
    if not messages:
        raise Invalid("missing_field", f"'{where}' is empty", messages)
    call_ids: set[str] = set()
    has_assistant = trained = False
    role: Any = None
    for i, message in enumerate(messages):
        at = f"{where}[{i}]"
        if not isinstance(message, dict):
            raise Invalid("invalid_type", f"{at} must be an object", message)
        unknown = message.keys() - MESSAGE_KEYS
        if unknown:
            raise Invalid("unknown_key", f"{at} has unknown key {sorted(unknown)[0]!r}", message)
        if "role" not in message:
            raise Invalid("missing_field", f"{at} has no 'role'", message)
        role = message["role"]
        if role not in ROLES:
            raise Invalid("invalid_role", f"{at}.role must be one of {', '.join(sorted(ROLES))}", role)
        if "name" in message and not isinstance(message["name"], str):
            raise Invalid("invalid_type", f"{at}.name must be a string", message["name"])
        weight = message.get("weight", 1)
        if "weight" in message and (role != "assistant" or not is_int(weight) or weight not in (0, 1)):
            what = "0 or 1" if role == "assistant" else "only on assistant messages"
            raise Invalid("invalid_weight", f"{at}.weight must be {what}", weight)
        is_trained = role == "assistant" and weight == 1
        texts = _tool_calls(message, at, call_ids) if "tool_calls" in message else []
        if role == "tool":
            _tool_result(message, at, call_ids)
        content = message.get("content")
        if texts and content in (None, ""):
            pass  # an assistant turn that only calls tools needs no text
        else:
            texts.append(_content(message, at))
        for text in texts:
            measure.texts.append((text, is_trained))
        measure.overhead += MESSAGE_OVERHEAD
        if is_trained:
            measure.trained_overhead += TRAINED_OVERHEAD
        has_assistant = has_assistant or role == "assistant"
        trained = trained or is_trained
    if has_assistant and not trained:
        raise Invalid("missing_assistant_message", "every assistant message has weight 0: nothing to learn")
    return trained, role


def _content(message: dict[str, Any], at: str) -> str:
    if message.get("content") is None:
        raise Invalid("missing_field", f"{at} has no 'content'", message)
    content = message["content"]
    if isinstance(content, list):  # content parts: only text can be trained on
        texts = []
        for j, part in enumerate(content):
            if not (
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            ):
                raise Invalid(
                    "invalid_type", f"{at}.content[{j}] must be {{'type': 'text', 'text': str}}", part
                )
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise Invalid("invalid_type", f"{at}.content must be a string", content)
    if not content.strip():
        raise Invalid("empty_content", f"{at}.content is empty", content)
    return content


def _tool_calls(message: dict[str, Any], at: str, call_ids: set[str]) -> list[str]:
    calls = message["tool_calls"]
    if message["role"] != "assistant":
        raise Invalid("invalid_tool_call", f"{at} has 'tool_calls', but only assistant messages call tools")
    if not isinstance(calls, list) or not calls:
        raise Invalid("invalid_tool_call", f"{at}.tool_calls must be a non-empty list", calls)
    texts = []
    for j, call in enumerate(calls):
        where = f"{at}.tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(call, dict) or not isinstance(fn, dict):
            raise Invalid("invalid_tool_call", f"{where} must have a 'function' object", call)
        if not isinstance(call.get("id"), str) or not call["id"]:
            raise Invalid("invalid_tool_call", f"{where} has no 'id'", call)
        if call.get("type", "function") != "function":
            raise Invalid("invalid_tool_call", f"{where}.type must be 'function'", call.get("type"))
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise Invalid("invalid_tool_call", f"{where}.function.name must be a non-empty string", fn)
        if not isinstance(fn.get("arguments"), str):
            raise Invalid("invalid_tool_call", f"{where}.function.arguments must be a JSON string", fn)
        call_ids.add(call["id"])
        texts.append(fn["name"] + fn["arguments"])
    return texts


def _tool_result(message: dict[str, Any], at: str, call_ids: set[str]) -> None:
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise Invalid("missing_field", f"{at} (a tool result) has no 'tool_call_id'", message)
    if call_id not in call_ids:
        raise Invalid("invalid_tool_call", f"{at}.tool_call_id answers no earlier tool call", call_id)


def _check_prompt(record: dict[str, Any], measure: Measure) -> None:
    """The prompt of a pair, a ranking or an RLHF line: 'prompt' (text or messages) or 'messages'."""
    name = "prompt" if "prompt" in record else "messages"
    if name not in record:
        raise Invalid("missing_field", "needs 'prompt' or 'messages'", sorted(record)[:8])
    prompt = record[name]
    if isinstance(prompt, str):
        if name == "messages":
            raise Invalid("invalid_type", "'messages' must be a list of messages", prompt)
        measure.texts.append((prompt, False))
        measure.overhead += MESSAGE_OVERHEAD
        return
    _, last_role = _check_messages(prompt, name, measure)
    if last_role == "assistant" and not any(k in record for k in ("chosen", "rejected", "responses")):
        raise Invalid("mixed_formats", f"'{name}' ends with an assistant turn; an RLHF prompt must not")
    # A prompt is never trained on: only the responses are.
    measure.texts[:] = [(t, False) for t, _ in measure.texts]
    measure.trained_overhead = 0


def _check_response(value: Any, where: str, measure: Measure) -> None:
    if isinstance(value, str):
        if not value.strip():
            raise Invalid("empty_content", f"'{where}' is empty", value)
        measure.texts.append((value, True))
    elif isinstance(value, list) and value:
        for i, message in enumerate(value):
            if isinstance(message, dict) and message.get("role", "assistant") != "assistant":
                raise Invalid("invalid_role", f"{where}[{i}].role must be assistant", message.get("role"))
        _check_messages(value, where, measure)
        return
    else:
        raise Invalid("invalid_type", f"'{where}' must be a string or a list of assistant messages", value)
    measure.overhead += MESSAGE_OVERHEAD
    measure.trained_overhead += TRAINED_OVERHEAD


def _check_pair(record: dict[str, Any]) -> Measure:
    measure = Measure()
    _check_prompt(record, measure)
    for name in ("chosen", "rejected"):
        if name not in record:
            raise Invalid("missing_field", f"needs '{name}'", sorted(record)[:8])
        _check_response(record[name], name, measure)
    return measure


def _check_ranking(record: dict[str, Any]) -> Measure:
    measure = Measure()
    _check_prompt(record, measure)
    for name in ("responses", "ranking"):
        if name not in record:
            raise Invalid("missing_field", f"needs '{name}'", sorted(record)[:8])
    responses, ranking = record["responses"], record["ranking"]
    if not isinstance(responses, list):
        raise Invalid("invalid_type", "'responses' must be a list", responses)
    if len(responses) < 2:
        raise Invalid("too_few_responses", "'responses' needs at least 2 answers to rank", responses)
    for i, response in enumerate(responses):
        _check_response(response, f"responses[{i}]", measure)
    valid = (
        isinstance(ranking, list)
        and all(is_int(i) for i in ranking)
        and sorted(ranking) == list(range(len(responses)))
    )
    if not valid:
        raise Invalid(
            "invalid_ranking", "'ranking' must list every response index exactly once, best first", ranking
        )
    return measure


def _check_prompt_completion(record: dict[str, Any]) -> Measure:
    if "prompt" not in record:
        raise Invalid("missing_field", "needs 'prompt' with its 'completion'", sorted(record)[:8])
    prompt, completion = record["prompt"], record["completion"]
    if not isinstance(prompt, str):
        raise Invalid("invalid_type", "'prompt' must be a string", prompt)
    if not isinstance(completion, str):
        raise Invalid("invalid_type", "'completion' must be a string", completion)
    if not completion.strip():
        raise Invalid("empty_content", "'completion' is empty", completion)
    return Measure([(prompt, False), (completion, True)], 2 * MESSAGE_OVERHEAD, TRAINED_OVERHEAD)
