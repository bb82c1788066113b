"""A fast path for the common case, chat lines. msgspec decodes a whole block of lines in one C
call against a strict schema that states most rules itself: known keys only, one struct per
role (so a weight can only sit on an answer, tool calls only on an answer, a tool result needs
its call id), text that is not blank, weight 0 or 1. Python then only checks what a schema
cannot say (there is an answer to learn from; a tool result answers an earlier call), and only
walks the messages of a line that has weights, tool calls or a null content.

It never names a problem. A line it cannot prove valid gets None and goes through ``rules``,
which name the problem; so it can only be faster than the rules, never different. Tests run
both over the malformed-file corpus and random files and compare. Without msgspec installed,
every line takes the rules path.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Annotated, Any, Literal, NamedTuple

from tuneforge_api.validation.rules import CHAT, CHAT_OR_PROMPT, MESSAGE_OVERHEAD, TRAINED_OVERHEAD

try:
    import msgspec
except ImportError:  # optional: the rules alone are correct, only slower
    msgspec = None

_content = attrgetter("content")
_weight = attrgetter("weight")
_tool_calls = attrgetter("tool_calls")

if msgspec is not None:
    UNSET = msgspec.UNSET
    # Not empty; blank text is checked in kind_of (a schema pattern would double the decode time).
    _Text = Annotated[str, msgspec.Meta(min_length=1)]
    _Id = _Text

    class _Function(msgspec.Struct, forbid_unknown_fields=True, gc=False):
        name: _Id
        arguments: str

    class _ToolCall(msgspec.Struct, forbid_unknown_fields=True, gc=False):
        id: _Id
        function: _Function
        type: Literal["function"] = "function"

    class _Message(msgspec.Struct, forbid_unknown_fields=True, gc=False, tag_field="role"):
        pass

    class _System(_Message, tag="system"):
        content: _Text
        name: str | msgspec.UnsetType = UNSET

    class _Developer(_Message, tag="developer"):
        content: _Text
        name: str | msgspec.UnsetType = UNSET

    class _User(_Message, tag="user"):
        content: _Text
        name: str | msgspec.UnsetType = UNSET

    class _Assistant(_Message, tag="assistant"):
        content: _Text | None = None
        weight: Literal[0, 1] = 1
        name: str | msgspec.UnsetType = UNSET
        tool_calls: Annotated[list[_ToolCall], msgspec.Meta(min_length=1)] | None = None

    class _Tool(_Message, tag="tool"):
        content: _Text
        tool_call_id: _Id
        name: str | msgspec.UnsetType = UNSET

    class _Chat(msgspec.Struct, forbid_unknown_fields=True, gc=False):
        messages: list[_System | _Developer | _User | _Assistant | _Tool]

    _DECODER = msgspec.json.Decoder(_Chat)
    _ERRORS: tuple[type[BaseException], ...] = (msgspec.DecodeError, RecursionError, ValueError)
    _is_answer = _Assistant.__instancecheck__
    _is_tool_result = _Tool.__instancecheck__


AVAILABLE = msgspec is not None


def decode_lines(block: bytes, lines: list[bytes]) -> list:
    """One decoded chat example per line, None where a line is not one (or is blank)."""
    if msgspec is None:
        return [None] * len(lines)
    try:
        examples = _DECODER.decode_lines(block)
        if len(examples) == len(lines):  # else a blank line was skipped: go line by line
            return examples
    except _ERRORS:
        pass
    out = []
    for line in lines:
        try:
            out.append(_DECODER.decode(line))
        except _ERRORS:
            out.append(None)
    return out


def kind_of(example: Any) -> str | None:
    """CHAT or CHAT_OR_PROMPT for a valid decoded example; None when the rules must look.

    Every step is a C-level map or filter: a Python loop over messages would cost more than
    decoding them. Only an example with weights, tool calls or an answer without text is walked.
    """
    if example is None:
        return None
    messages = example.messages
    answers = list(filter(_is_answer, messages))
    if not answers:
        return None
    texts = list(map(_content, messages))
    if None not in texts and any(map(str.isspace, texts)):
        return None
    unusual = (
        None in texts
        or 0 in map(_weight, answers)
        or any(map(_tool_calls, answers))
        or any(map(_is_tool_result, messages))
    )
    if unusual and walk(messages) is None:
        return None
    return CHAT if type(messages[-1]) is _Assistant else CHAT_OR_PROMPT


def walk(messages: list) -> tuple[list[tuple[str, bool]], int] | None:
    """Every message: texts (with whether each is trained) and the number of trained answers;
    None when an answer has neither text nor tool calls, a tool result answers no earlier call,
    or nothing is trained."""
    texts: list[tuple[str, bool]] = []
    n_trained = 0
    call_ids: set[str] = set()
    for m in messages:
        trained = False
        if type(m) is _Assistant:
            trained = m.weight == 1
            n_trained += trained
            if m.tool_calls is not None:
                for call in m.tool_calls:
                    call_ids.add(call.id)
                    texts.append((call.function.name + call.function.arguments, trained))
                if m.content:
                    if m.content.isspace():
                        return None
                    texts.append((m.content, trained))
                continue
            if not m.content or m.content.isspace():
                return None
        elif type(m) is _Tool and m.tool_call_id not in call_ids:
            return None
        texts.append((m.content, trained))
    return (texts, n_trained) if n_trained else None


def texts_of(example: Any) -> tuple[list[tuple[str, bool]], int, int]:
    """Texts and template allowance of a valid example, as ``rules.Measure`` has them."""
    walked = walk(example.messages)
    assert walked is not None
    texts, n_trained = walked
    return texts, MESSAGE_OVERHEAD * len(example.messages), TRAINED_OVERHEAD * n_trained


def trained_size(example: Any) -> int:
    """As ``rules.Measure.sizes()[1]``: trained text bytes plus the end-of-turn allowance."""
    texts, _, trained_overhead = texts_of(example)
    return trained_overhead + sum(
        len(t) if t.isascii() else len(t.encode("utf-8", "surrogatepass"))
        for t, is_trained in texts
        if is_trained
    )


class BlockFacts(NamedTuple):
    """What the fast path learned of a block's lines, small enough to send between processes.

    ``kinds[i]`` is kind_of line i (None: the rules must look); ``trained`` and ``texts`` hold,
    by line index, the trained size of valid lines with ``line % trained_stride == 0`` and the
    token-sample texts (``texts_of``) of valid lines with ``line % sample_stride == 0``.
    """

    kinds: list[str | None]
    trained: dict[int, int]
    texts: dict[int, tuple[list[tuple[str, bool]], int, int]]


def classify(
    block: bytes, lines: list[bytes], first: int, trained_stride: int, sample_stride: int
) -> BlockFacts:
    """The fast path over one block of whole lines (``first`` is the first line's number)."""
    examples = decode_lines(block, lines)
    kinds = list(map(kind_of, examples))
    trained = {
        i: trained_size(examples[i])
        for i in range(-first % trained_stride, len(lines), trained_stride)
        if kinds[i] is not None
    }
    texts = {}
    if sample_stride:
        texts = {
            i: texts_of(examples[i])
            for i in range(-first % sample_stride, len(lines), sample_stride)
            if kinds[i] is not None
        }
    return BlockFacts(kinds, trained, texts)


def classify_block(block: bytes, n: int, first: int, trained_stride: int, sample_stride: int) -> BlockFacts:
    """``classify`` for a worker process, which gets the block and its line count only."""
    lines = block.split(b"\n", n - 1) if n > 1 else [block]
    return classify(block, lines, first, trained_stride, sample_stride)
