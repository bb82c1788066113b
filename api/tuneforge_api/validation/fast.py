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

``classify`` does all of a block's per-line work (split, keys, sizes, decoding, kinds, the
sampled measurements), so that on worker processes the calling process only keeps the books.
Samples are chosen by line key, not line number, so a worker needs no line numbers.

Where the C scanner is built (``native/linescan.c``, ``NATIVE``), it goes first: it proves
common chat lines valid without a Python object per line, and msgspec decodes only the lines it
is unsure of (other formats, content parts, anything doubtful) and the sampled ones. Without it,
msgspec decodes every line.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from itertools import accumulate, chain, compress
from operator import attrgetter, itemgetter
from typing import Annotated, Any, ClassVar, Literal, NamedTuple

import xxhash

from tuneforge_api.validation.rules import CHAT, CHAT_OR_PROMPT, MESSAGE_OVERHEAD, TRAINED_OVERHEAD

try:
    import msgspec
except ImportError:  # optional: the rules alone are correct, only slower
    msgspec = None

try:
    from tuneforge_api.validation import _linescan
except ImportError:  # not built (no C compiler at install): msgspec decodes every line
    _linescan = None

log = logging.getLogger(__name__)

_content = attrgetter("content")
_weight = attrgetter("weight")
_tool_calls = attrgetter("tool_calls")
_messages = attrgetter("messages")

# A line's identity for duplicates and sampling: 64 bits, the same in every process (Python's
# own hash() is salted per process, and worker processes compute keys for the caller).
line_key = xxhash.xxh3_64_intdigest

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
        # Not fields (a user message may not carry them): every message reads as an answer
        # with weight 1 and no tool calls, so kinds_of can map over all messages at once.
        weight: ClassVar[int] = 1
        tool_calls: ClassVar[None] = None

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
    _CHAT_IF_ANSWER = {_Assistant: CHAT}  # an example that ends with an answer is a chat


AVAILABLE = msgspec is not None
NATIVE = AVAILABLE and _linescan is not None


def decode_lines(block: bytes, stripped: list[bytes]) -> list:
    """One decoded chat example per line (``stripped``: the block's lines, stripped), None where
    a line is not one (or is blank).

    msgspec reads a block as a stream of values, whatever the newlines, so a value split over two
    lines, or two values on one, could still give one value per line. The block's values are
    taken only when, besides that count, every line starts with ``{`` and ends with ``}``: a value
    open at the end of such a line would need a ``,`` or a bracket next, never a ``{``, so no
    value spans lines, and the count then leaves exactly one per line.
    """
    if msgspec is None:
        return [None] * len(stripped)
    if all(map(_is_object_shaped, stripped)):
        try:
            examples = _DECODER.decode_lines(block)
            if len(examples) == len(stripped):
                return examples
        except _ERRORS:
            pass
    return list(map(_decode_or_none, stripped))


def _is_object_shaped(line: bytes) -> bool:
    return line[:1] == b"{" and line[-1:] == b"}"


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
    if any(map(str.isspace, filter(None, texts))):
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


def kinds_of(examples: list) -> list[str | None]:
    """``kind_of`` of every example of a block, in a few C-level passes over all their messages
    at once; only an example with something unusual (or without a final answer) is looked at
    alone. A Python loop per example would cost more than decoding it."""
    present = examples if None not in examples else [e for e in examples if e is not None]
    kinds = _kinds_of_present(present)
    if present is examples:
        return kinds
    found = iter(kinds)
    return [None if e is None else next(found) for e in examples]


def _kinds_of_present(examples: list) -> list[str | None]:
    messages = list(map(_messages, examples))
    counts = list(map(len, messages))
    if len(counts) < 2 or 0 in counts:
        return list(map(kind_of, examples))
    flat = list(chain.from_iterable(messages))
    lasts = list(accumulate(counts, initial=-1))[1:]  # where each example's last message sits in flat
    types = list(map(type, flat))
    kinds: list[str | None] = list(map(_CHAT_IF_ANSWER.get, itemgetter(*lasts)(types)))
    # Where something unusual sits; each check is one pass in C, and finding nothing is the rule.
    unusual: list[int] = []
    texts = list(map(_content, flat))
    if None in texts:
        unusual += _positions(texts, None)
        texts = list(map(str, texts))  # str(None) is not blank
    if any(map(str.isspace, texts)):
        unusual += _positions(list(map(str.isspace, texts)), True)
    if _Tool in types:
        unusual += _positions(types, _Tool)
    if 0 in map(_weight, flat):
        unusual += _positions(list(map(_weight, flat)), 0)
    if any(map(_tool_calls, flat)):
        unusual += compress(range(len(flat)), map(_tool_calls, flat))
    redo = {bisect_left(lasts, i) for i in unusual}
    redo.update(_positions(kinds, None))  # no final answer: a prompt, or no answer at all
    for j in redo:
        kinds[j] = kind_of(examples[j])
    return kinds


def _chosen(keys: list[int], stride: int) -> list[int] | range:
    """The lines a stride samples: those whose key is a multiple of it."""
    return range(len(keys)) if stride == 1 else _positions(list(map(stride.__rmod__, keys)), 0)


def _positions(values: list, value: object) -> list[int]:
    """Where ``value`` occurs in ``values`` (searched in C; the common answer is nowhere)."""
    found: list[int] = []
    try:
        while True:
            found.append(values.index(value, found[-1] + 1 if found else 0))
    except ValueError:
        return found


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
    """What ``classify`` learned of a block's lines, small enough to send between processes.

    Per line (by index in the block): ``kinds`` (None: the rules must look), ``keys``
    (``line_key`` of the stripped line) and ``sizes`` (its length). ``odd`` holds the lines whose
    kind is None, which the caller hands to the rules; ``trained`` and ``texts`` hold the trained
    size, and the token-sample texts (``texts_of``), of the valid lines whose key the trained
    and sample strides select.
    """

    n: int
    kinds: list[str | None]
    keys: list[int]
    sizes: list[int]
    longest: int
    odd: dict[int, bytes]
    trained: dict[int, int]
    texts: dict[int, tuple[list[tuple[str, bool]], int, int]]


def split_lines(block: bytes) -> list[bytes]:
    """A block's lines; each but a final one without its newline (the rules strip either way)."""
    lines = block.split(b"\n")
    if len(lines) > 1 and not lines[-1]:
        lines.pop()
    return lines


def classify(block: bytes, trained_stride: int, sample_stride: int, native: bool | None = None) -> BlockFacts:
    """The fast path over one block of whole lines: the C scanner's, where it is built (or as
    ``native`` says: tests run both)."""
    if native is None:
        native = NATIVE
    if native:
        return classify_scanned(block, trained_stride, sample_stride)
    return classify_decoded(block, trained_stride, sample_stride)


def classify_scanned(block: bytes, trained_stride: int, sample_stride: int) -> BlockFacts:
    """``classify`` with the C scanner first; msgspec decodes only the lines it is unsure of,
    and the valid lines that a stride samples (their texts are measured)."""
    assert _linescan is not None and msgspec is not None
    scan = _linescan.scan(block, CHAT, CHAT_OR_PROMPT, trained_stride, sample_stride)
    kinds, keys, sizes, longest, unsure, chosen = scan
    stripped = [line.strip() for line in chosen.values()]
    examples = dict(zip(chosen, decode_lines(b"\n".join(stripped), stripped), strict=True))
    for i, example in list(examples.items()):
        if kind_of(example) != kinds[i]:  # never seen (tests compare the paths); if ever, as unsure
            log.warning("the C line scanner and msgspec disagree on a line; the rules decide it")
            del examples[i]
            unsure[i] = chosen[i]
    odd = {}
    for i in sorted(unsure):
        line = unsure[i]
        example = _decode_or_none(line.strip())
        kinds[i] = kind = kind_of(example)
        if kind is None:
            odd[i] = line
        elif keys[i] % trained_stride == 0 or (sample_stride and keys[i] % sample_stride == 0):
            examples[i] = example
    in_order = sorted(examples)  # the token sample thins by position: keep line order
    trained = {i: trained_size(examples[i]) for i in in_order if keys[i] % trained_stride == 0}
    texts = {}
    if sample_stride:
        texts = {i: texts_of(examples[i]) for i in in_order if keys[i] % sample_stride == 0}
    return BlockFacts(len(kinds), kinds, keys, sizes, longest, odd, trained, texts)


def _decode_or_none(line: bytes) -> Any:
    try:
        return _DECODER.decode(line)
    except _ERRORS:
        return None


def classify_decoded(block: bytes, trained_stride: int, sample_stride: int) -> BlockFacts:
    """``classify`` with msgspec decoding every line."""
    lines = split_lines(block)
    stripped = list(map(bytes.strip, lines))
    keys = list(map(line_key, stripped))
    examples = decode_lines(block, stripped)
    kinds = kinds_of(examples)
    odd = {i: lines[i] for i in _positions(kinds, None)}
    trained = {i: trained_size(examples[i]) for i in _chosen(keys, trained_stride) if kinds[i] is not None}
    texts = {}
    if sample_stride:
        texts = {i: texts_of(examples[i]) for i in _chosen(keys, sample_stride) if kinds[i] is not None}
    sizes = list(map(len, stripped))
    return BlockFacts(len(lines), kinds, keys, sizes, max(map(len, lines)), odd, trained, texts)
