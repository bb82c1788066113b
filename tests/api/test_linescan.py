"""The C line scanner (``validation/native/linescan.c``) against the paths it stands in front of.

It may only ever make validation faster, never different: for every block whatsoever,
``fast.classify`` gives equal ``BlockFacts`` with the scanner and without it, and a line the
scanner calls valid is one the reference rules accept, with the same kind and no problem. Also
its line splitting, keys and sizes on arbitrary bytes, that it leaks neither references nor
memory, and that it is built wherever it can be.
"""

from __future__ import annotations

import gc
import os
import random
import shutil
import sys
import sysconfig
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tuneforge_api.validation import fast, rules
from tuneforge_api.validation.rules import CHAT, CHAT_OR_PROMPT
from tuneforge_api.validation.scan import parse_line

needs_scanner = pytest.mark.skipif(
    not fast.NATIVE, reason="the C scanner is not built (see test_scanner_is_built)"
)

# Like tests/fuzz/test_validator.py: reproducible, and TUNEFORGE_FUZZ_EXAMPLES scales it up.
FUZZ_SCALE = int(os.environ.get("TUNEFORGE_FUZZ_EXAMPLES", "10"))
PROPERTY = settings(
    max_examples=100 * FUZZ_SCALE,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
# The main property (generated blocks) gets more: about 7 s in CI.
BLOCKS = settings(PROPERTY, max_examples=300 * FUZZ_SCALE)
BOM = b"\xef\xbb\xbf"


def scan(block: bytes, trained_stride: int = 1, sample_stride: int = 0) -> tuple:
    assert fast._linescan is not None
    return fast._linescan.scan(block, CHAT, CHAT_OR_PROMPT, trained_stride, sample_stride)


def verdict(line: bytes) -> str | None:
    """The raw scanner's kind for one line."""
    kinds = scan(line)[0]
    assert len(kinds) == 1
    return kinds[0]


def reference_kind(line: bytes) -> str:
    """The reference path's verdict on one line: its kind, or ``invalid:<code>``."""
    try:
        record = parse_line(line.strip())
        if not isinstance(record, dict):
            return "invalid:not_object"
        return rules.check_record(record)[0]
    except rules.Invalid as problem:
        return f"invalid:{problem.code}"


def assert_sound(block: bytes, trained_stride: int = 1, sample_stride: int = 0) -> None:
    """The scanner's two promises on one block: ``classify`` gives the same facts with it and
    without it, and each line it calls valid the rules accept with that kind."""
    with_scanner = fast.classify(block, trained_stride, sample_stride, native=True)
    without = fast.classify(block, trained_stride, sample_stride, native=False)
    assert with_scanner == without, f"classify disagrees on {block!r}"
    # The token sample takes texts in this order (and thins by position), so order matters too.
    assert list(with_scanner.texts) == list(without.texts), f"sampled texts in another order for {block!r}"
    kinds = scan(block, trained_stride, sample_stride)[0]
    for line, kind in zip(fast.split_lines(block), kinds, strict=True):
        if kind is not None:
            assert reference_kind(line) == kind, f"the scanner says {kind} for {line!r}"


# --- 1. Generated chat lines with mutations --------------------------------------------------
#
# Lines are built as a small tree (so keys can repeat and come in any order, and strings keep
# the exact bytes written between their quotes), then written out with whitespace between tokens.


@dataclass
class Str:
    body: bytes  # as written between the quotes


@dataclass
class Raw:
    token: bytes  # any other value, as written (numbers, literals, or garbage)


@dataclass
class Arr:
    items: list


@dataclass
class Obj:
    members: list[tuple[bytes, object]] = field(default_factory=list)  # keys as written


def render(value: object, gap: Callable[[], bytes]) -> bytes:
    """JSON text of a tree, with ``gap()`` between every two tokens."""
    if isinstance(value, Str):
        return b'"' + value.body + b'"'
    if isinstance(value, Raw):
        return value.token
    out = [b"[" if isinstance(value, Arr) else b"{", gap()]
    items = value.items if isinstance(value, Arr) else value.members
    for i, item in enumerate(items):
        if i:
            out += [gap(), b",", gap()]
        if isinstance(value, Obj):
            key, item = item
            out += [b'"' + key + b'"', gap(), b":", gap()]
        out.append(render(item, gap))
    out += [gap(), b"]" if isinstance(value, Arr) else b"}"]
    return b"".join(out)


def utf8(*texts: str) -> list[bytes]:
    return [t.encode() for t in texts]


# Text the rules accept as content (not blank), most of which the scanner can prove so.
GOOD_TEXTS = [
    b"hi",
    b"x y",
    b"Hello, world!",
    b"a" * 100,
    b"   padded   ",
    b'say \\"hi\\"',
    b"back\\\\slash",
    b"1\\/2",
    b"line\\nbreak",
    b"tab\\there",
    b"\\u00e9t\\u00E9 ok",
    b"\x7f",
    b"\\\\",
    b'\\"',
    b"\\/",
    *utf8("café", "東京 ok", "😀!", "\u3000x\u3000", "é"),
]
# Every code point str.isspace() calls blank, above ASCII, raw and escaped.
UNICODE_SPACES = [
    *utf8(
        "\u0085",
        "\u00a0",
        "\u1680",
        "\u2000",
        "\u2009",
        "\u200a",
        "\u2028",
        "\u2029",
        "\u202f",
        "\u205f",
        "\u3000",
    ),
    *[
        b"\\u%04x" % c
        for c in (0x1C, 0x1F, 0x85, 0xA0, 0x1680, 0x2000, 0x200A, 0x2028, 0x2029, 0x202F, 0x205F, 0x3000)
    ],
]
# Not blank to the rules, but neither printable ASCII nor a plain visible escape.
NOT_BLANK = [
    b"\\u00e9",
    b"\\u0000",
    b"\\b",
    b"\\u200b",
    b"\\u180e",
    b"\\u2060",
    b"\\ud83d\\ude00",
    *utf8("é", "\ufeff", "😀", "\u180e", "\u200b", "\u2060", "\uffff", "\U0010ffff"),
]
ESCAPES = [
    b'\\"',
    b"\\\\",
    b"\\/",
    b"\\n",
    b"\\t",
    b"\\r",
    b"\\f",
    b"\\b",
    b"\\u00e9",
    b"\\u3000",
    b"\\u2028",
    b"\\u0020",
    b"\\u0000",
    b"\\ud83d\\ude00",
    b"\\ud800",
    b"\\udc00",
    b"\\ud800\\u0041",
    b"\\x41",
    b"\\u12",
    b"\\u12g4",
    b"\\U0041",
    b"\\a",
]
BAD_UTF8 = [
    b"\xc0\x80",  # overlong NUL
    b"\xc1\xbf",
    b"\xe0\x80\x80",
    b"\xf0\x80\x80\x80",
    b"\xed\xa0\x80",  # surrogates
    b"\xed\xbf\xbf",
    b"\xf4\x90\x80\x80",  # above U+10FFFF
    b"\xf5\x80\x80\x80",
    b"\xf8\x88\x80\x80\x80",
    b"\xff",
    b"\xfe",
    b"\x80",
    b"\xbf",
    b"\xc3",  # truncated sequences
    b"\xe3\x80",
    b"\xf0\x9f\x98",
    b"\xe3\x80\x41",
    b"\xc3\xc3\xa9",
]
CONTROL = [b"\x00", b"\x01", b"\x08", b"\x09", b"\x0b", b"\x0c", b"\x0d", b"\x1b", b"\x1f"]
ODDITIES = BAD_UTF8 + CONTROL + ESCAPES + UNICODE_SPACES + NOT_BLANK


class LineMaker:
    """One chat line, mostly valid: each choice goes odd with probability ``odd``."""

    def __init__(self, rnd: random.Random, odd: float) -> None:
        self.rnd, self.odd = rnd, odd
        self.call_ids: list[bytes] = []

    def is_odd(self) -> bool:
        return self.rnd.random() < self.odd

    def pick(self, good: list, odd: list) -> object:
        return self.rnd.choice(odd if self.is_odd() else good)

    def text(self) -> bytes:
        r = self.rnd
        if not self.is_odd():
            if r.random() < 0.2:  # a visible character at any offset of a run of spaces (SSE)
                return (
                    b" " * r.randrange(40)
                    + r.choice([b"x", b"\x7f", b'\\"', b"\\/"])
                    + b" " * r.randrange(20)
                )
            return r.choice(GOOD_TEXTS)
        shape = r.randrange(6)
        if shape == 0:  # empty or blank: ASCII and Unicode whitespace, raw or escaped
            pieces = [b" ", b"  ", b"\\n", b"\\t", b"\\u3000", b"\\u0020", *UNICODE_SPACES]
            return b"".join(r.choice(pieces) for _ in range(r.randrange(5))) + b" " * r.randrange(20)
        if shape == 1:  # one oddity at every offset mod 16 of a long string (16-byte reads)
            lead = r.choice([b"a", b" ", b"\\/"])
            return lead * r.randrange(48) + r.choice(ODDITIES) + r.choice([b"", b"z", b"z" * 20, b" " * 17])
        if shape == 2:  # one non-blank character among blanks, at any offset
            blanks = [b" ", b"\\n", *UNICODE_SPACES]
            return b" " * r.randrange(40) + r.choice(blanks) + r.choice(NOT_BLANK) + r.choice(blanks)
        return b"".join(r.choice([*GOOD_TEXTS, *ODDITIES]) for _ in range(1 + r.randrange(4)))

    def name(self) -> object:
        good = [Str(b"bob"), Str(b""), Str(b"\\u00e9"), Str(b" ")]
        odd = [Raw(b"7"), Raw(b"null"), Raw(b"true"), Arr([]), Obj(), Str(self.text())]
        return self.pick(good, odd)

    def weight(self) -> Raw | Str:
        good = [Raw(b"0"), Raw(b"1"), Raw(b"1"), Raw(b"1")]
        odd = [
            Raw(t)
            for t in [
                b"1.0",
                b"0.0",
                b"true",
                b"false",
                b"-0",
                b"-1",
                b"01",
                b"00",
                b"2",
                b"1e0",
                b"null",
                b"10",
            ]
        ]
        return self.pick(good, [*odd, Str(b"1"), Str(b"0")])

    def call_id(self, answering: bool = False) -> object:
        if answering and self.call_ids and self.rnd.random() < 0.8:
            return Str(self.rnd.choice(self.call_ids))
        good = [Str(b"c1"), Str(b"c2"), Str(b"call_9"), Str(b"zz"), Str("é".encode())]
        odd = [
            Str(b""),
            Str(b"c\\u0031"),
            Str(b"c1 "),
            Str(b"\\u0063\\u0031"),
            Raw(b"1"),
            Raw(b"null"),
            Str(self.text()),
        ]
        return self.pick(good, odd)

    def function(self) -> object:
        members = [
            (
                b"name",
                self.pick(
                    [Str(b"f"), Str(b"get_weather"), Str(b"\\u0066"), Str(b" ")],
                    [Str(b""), Raw(b"1"), Raw(b"null")],
                ),
            ),
            (
                b"arguments",
                self.pick(
                    [Str(b"{}"), Str(b'{\\"a\\": 1}'), Str(b""), Str(self.text())],
                    [Raw(b"{}"), Obj(), Raw(b"null"), Raw(b"1")],
                ),
            ),
        ]
        self.mutate(members, [(b"description", Str(b"x")), (b"Name", Str(b"f"))])
        return self.pick([Obj(members)], [Raw(b"null"), Str(b"f"), Arr([Obj(members)])])

    def call(self) -> Obj:
        call_id = self.call_id()
        members = [(b"id", call_id), (b"function", self.function())]
        if self.rnd.random() < 0.5:
            members.append(
                (
                    b"type",
                    self.pick(
                        [Str(b"function")], [Str(b"tool"), Str(b"functio\\u006e"), Raw(b"null"), Str(b"")]
                    ),
                )
            )
        self.mutate(members, [(b"index", Raw(b"0")), (b"extra", Obj())])
        if isinstance(call_id, Str):
            self.call_ids.append(call_id.body)
        return Obj(members)

    def mutate(self, members: list, extras: list) -> None:
        """Shuffle keys; maybe drop, repeat or add one."""
        r = self.rnd
        r.shuffle(members)
        if members and self.is_odd():
            del members[r.randrange(len(members))]
        if members and self.is_odd():
            members.insert(r.randrange(len(members) + 1), r.choice(members))
        if self.is_odd():
            members.insert(r.randrange(len(members) + 1), r.choice(extras))

    def message(self) -> Obj:
        r = self.rnd
        role = r.choice(["user", "assistant", "assistant", "assistant_calls", "tool", "system", "developer"])
        if role == "tool" and not self.call_ids and r.random() < 0.7:
            role = "assistant_calls"  # most tool results should have a call to answer
        calls = role == "assistant_calls"
        role = "assistant" if calls else role
        members: list[tuple[bytes, object]] = []
        if calls:
            tool_calls = Arr([self.call() for _ in range(1 + r.randrange(3))])
            members.append(
                (b"tool_calls", self.pick([tool_calls], [Arr([]), Raw(b"null"), Str(b"x"), Obj()]))
            )
            content = self.pick([None, Raw(b"null"), Str(self.text())], [Str(b""), Arr([]), Raw(b"0"), Obj()])
            if content is not None:
                members.append((b"content", content))
        else:
            members.append(
                (
                    b"content",
                    self.pick(
                        [Str(self.text())],
                        [
                            Raw(b"null"),
                            Str(b""),
                            Raw(b"5"),
                            Obj(),
                            Arr([Obj([(b"type", Str(b"text")), (b"text", Str(b"hi"))])]),
                        ],
                    ),
                )
            )
        if role == "assistant" and r.random() < 0.4:
            members.append((b"weight", self.weight()))
        if role == "tool":
            members.append((b"tool_call_id", self.call_id(answering=True)))
        if r.random() < 0.3:
            members.append((b"name", self.name()))
        role_value = Str(role.encode())
        odd_roles = [
            Str(b"us\\u0065r"),
            Str(b"wizard"),
            Str(b""),
            Str(b"User"),
            Str(role.encode() + b" "),
            Raw(b"7"),
            Raw(b"null"),
        ]
        members.append((b"role", self.pick([role_value], odd_roles)))
        wrong_role_keys = [
            (b"weight", self.weight()),
            (b"tool_calls", Arr([self.call()])),
            (b"tool_call_id", self.call_id(answering=True)),
            (b"extra", Raw(b"1")),
            (b"Role", role_value),
            (b"ro\\u006ce", role_value),
            (b"content", Str(self.text())),
            (b"nested", nested(r)),
        ]
        self.mutate(members, wrong_role_keys)
        return Obj(members)

    def line(self) -> Obj:
        r = self.rnd
        messages = Arr([self.message() for _ in range(1 + r.randrange(5))])
        value = self.pick([messages], [Arr([]), Raw(b"null"), Str(b"hi"), Obj([(b"messages", messages)])])
        members: list[tuple[bytes, object]] = [(b"messages", value)]
        extras = [
            (b"x", Raw(b"1")),
            (b"prompt", Str(b"p")),
            (b"completion", Str(b"c")),
            (b"chosen", Str(b"c")),
            (b"messages", messages),
            (b"Messages", messages),
            (b"m\\u0065ssages", messages),
            (b"meta", nested(r)),
        ]
        self.mutate(members, extras)
        return Obj(members)


def nested(r: random.Random) -> object:
    depth = r.choice([1, 3, 31, 40])
    return Raw(b"[" * depth + b"{}" + b"]" * depth)


JSON_GAPS = [b" ", b"\t", b"\r", b"  ", b" \t\r "]
BAD_GAPS = [b"\x0b", b"\x0c", b"\x00", b"\xc2\xa0", b"\xe3\x80\x80", b"\x1c"]
EDGES = [b"", b" ", b"\t", b"\r", b"\x0b", b"\x0c", b"\x0c\x0b \t"]


@st.composite
def chat_lines(draw: st.DrawFn) -> bytes:
    """One generated chat line (without its newline)."""
    rnd = random.Random(draw(st.integers(0, 2**32)))  # uniform draws: hypothesis's randoms lean on 0
    odd = draw(st.sampled_from([0.0, 0.0, 0.02, 0.08, 0.25]))
    spacing = draw(st.sampled_from([0.0, 0.0, 0.3, 1.0]))
    bad_gaps = draw(st.sampled_from([0.0, 0.0, 0.0, 0.01]))
    tree = LineMaker(rnd, odd).line()

    def gap() -> bytes:
        if rnd.random() < bad_gaps:
            return rnd.choice(BAD_GAPS)
        return rnd.choice(JSON_GAPS) if rnd.random() < spacing else b""

    edge = EDGES if draw(st.booleans()) else [b""]
    return rnd.choice(edge) + render(tree, gap) + rnd.choice(edge)


@st.composite
def chat_blocks(draw: st.DrawFn) -> bytes:
    """A block of generated lines: blank lines, CRLF, a BOM on the first, with and without a
    final newline."""
    lines = draw(
        st.lists(
            st.one_of(chat_lines(), st.sampled_from([b"", b"  ", b"\t\r", b"\x0c"])), min_size=1, max_size=8
        )
    )
    if draw(st.booleans()):
        lines[0] = BOM + lines[0]
    ends = draw(st.lists(st.sampled_from([b"\n", b"\r\n"]), min_size=len(lines), max_size=len(lines)))
    block = b"".join(line + end for line, end in zip(lines, ends, strict=True))
    return block if draw(st.booleans()) else block.rstrip(b"\r\n")


STRIDES = st.sampled_from([(1, 0), (1, 1), (2, 0), (1, 3), (3, 2), (5, 7)])


@needs_scanner
@BLOCKS
@given(block=chat_blocks(), strides=STRIDES)
def test_generated_chat_blocks_agree_with_and_without_the_scanner(
    block: bytes, strides: tuple[int, int]
) -> None:
    """The whole BlockFacts (kinds, keys, sizes, problem lines, sampled sizes and texts) must not
    depend on whether the scanner ran, and the scanner may only vouch for lines the rules pass."""
    assert_sound(block, *strides)


@needs_scanner
@PROPERTY
@given(line=chat_lines())
def test_generated_chat_lines_alone(line: bytes) -> None:
    """One line at a time, so that a line the scanner wrongly vouches for is not hidden by a
    block-wide difference elsewhere."""
    assert_sound(line, 1, 1)


# --- 2. Each rule of the scanner, and each reason it must be unsure ---------------------------


def chat(*messages: bytes) -> bytes:
    return b'{"messages":[' + b",".join(messages) + b"]}"


def user(content: bytes = b'"hi"', extra: bytes = b"") -> bytes:
    return b'{"role":"user","content":' + content + extra + b"}"


def answer(content: bytes = b'"ok"', extra: bytes = b"") -> bytes:
    return b'{"role":"assistant","content":' + content + extra + b"}"


def call(
    call_id: bytes = b'"c1"', extra: bytes = b"", function: bytes = b'{"name":"f","arguments":"{}"}'
) -> bytes:
    return b'{"id":' + call_id + b',"type":"function","function":' + function + extra + b"}"


def calls(*tool_calls: bytes, content: bytes = b',"content":null') -> bytes:
    return b'{"role":"assistant"' + content + b',"tool_calls":[' + b",".join(tool_calls or (call(),)) + b"]}"


def result(call_id: bytes = b'"c1"', content: bytes = b'"42"') -> bytes:
    return b'{"role":"tool","tool_call_id":' + call_id + b',"content":' + content + b"}"


def said(text: bytes) -> bytes:
    """A chat whose user turn says ``text`` (the bytes between the quotes)."""
    return chat(user(b'"' + text + b'"'), answer())


U, A = user(), answer()
SPACED = (
    b' {\t"messages" :\r[ { "content" : "hi" ,\t"role":"user" } ,\r\n'.replace(b"\n", b"")
    + b'{"tool_calls" : [ { "function" : { "arguments" : "" , "name" : "f" } , "id" : "c1" } ] ,'
    + b' "role" : "assistant" } ,'
    + b' {"content":"42","tool_call_id":"c1","role":"tool"} , {"role":"assistant","content":"done"} ] } '
)
# (line, the scanner's verdict, the reference rules' verdict)
CASES = [
    # What the scanner accepts.
    pytest.param(chat(U, A), CHAT, CHAT, id="user-answer"),
    pytest.param(chat(user().replace(b"user", b"system"), user(), A), CHAT, CHAT, id="system"),
    pytest.param(chat(user().replace(b"user", b"developer"), A), CHAT, CHAT, id="developer"),
    pytest.param(chat(U, A, U), CHAT_OR_PROMPT, CHAT_OR_PROMPT, id="ends-with-a-prompt"),
    pytest.param(
        chat(U, answer(extra=b',"weight":0'), U, answer(extra=b',"weight":1')), CHAT, CHAT, id="weights"
    ),
    pytest.param(chat(U, A, answer(extra=b',"weight":0')), CHAT, CHAT, id="untrained-last-answer"),
    pytest.param(chat(user(extra=b',"name":""'), answer(extra=b',"name":"bob"')), CHAT, CHAT, id="names"),
    pytest.param(chat(b'{"content":"hi","role":"user"}', A), CHAT, CHAT, id="content-before-role"),
    pytest.param(chat(U, calls(), result(), A), CHAT, CHAT, id="call-answered"),
    pytest.param(chat(U, calls(content=b""), result()), CHAT_OR_PROMPT, CHAT_OR_PROMPT, id="call-no-content"),
    pytest.param(chat(U, calls(content=b',"content":"let me see"')), CHAT, CHAT, id="call-with-text"),
    pytest.param(
        chat(U, calls(call(), call(b'"c2"')), result(b'"c2"'), result()),
        CHAT_OR_PROMPT,
        CHAT_OR_PROMPT,
        id="two-calls",
    ),
    pytest.param(
        chat(U, calls(), U, calls(call(b'"c2"')), result()),
        CHAT_OR_PROMPT,
        CHAT_OR_PROMPT,
        id="answers-older-call",
    ),
    pytest.param(
        chat(U, calls(call(function=b'{"name":"\\u0066","arguments":"\\"x\\""}'))),
        CHAT,
        CHAT,
        id="escaped-fn",
    ),
    pytest.param(
        chat(U, calls(call(b'"\xc3\xa9 "')), result(b'"\xc3\xa9 "')),
        CHAT_OR_PROMPT,
        CHAT_OR_PROMPT,
        id="utf8-id",
    ),
    pytest.param(SPACED, CHAT, CHAT, id="json-whitespace-everywhere"),
    pytest.param(b"\x0c\x0b \t" + chat(U, A) + b"\r\x0b", CHAT, CHAT, id="strip-whitespace-around"),
    pytest.param(said(b'\\"'), CHAT, CHAT, id="escaped-quote-is-visible"),
    pytest.param(said(b"\\\\"), CHAT, CHAT, id="escaped-backslash-is-visible"),
    pytest.param(said(b"\\/"), CHAT, CHAT, id="escaped-slash-is-visible"),
    pytest.param(said(b"\x7f"), CHAT, CHAT, id="del-is-visible"),
    pytest.param(said(b" " * 37 + b"x"), CHAT, CHAT, id="visible-after-16-byte-reads"),
    pytest.param(said("\u3000é😀\uffff x\u2028".encode()), CHAT, CHAT, id="utf8-text"),
    pytest.param(said(b"\\u00e9\\u0000\\b\\n x"), CHAT, CHAT, id="escapes-and-a-visible"),
    pytest.param(said(b"\\u00e9"), CHAT, CHAT, id="escaped-letter"),
    pytest.param(said(b"\\u0000"), CHAT, CHAT, id="escaped-nul-is-not-blank"),
    pytest.param(said(b"\\b"), CHAT, CHAT, id="backspace-is-not-blank"),
    pytest.param(said(b"\\u200b"), CHAT, CHAT, id="zero-width-space-is-not-blank"),
    pytest.param(said("\u180e".encode()), CHAT, CHAT, id="mongolian-vowel-separator-is-not-blank"),
    pytest.param(said("é".encode()), CHAT, CHAT, id="utf8-letter"),
    pytest.param(said(b"\\u00C9"), CHAT, CHAT, id="escaped-letter-uppercase-hex"),
    pytest.param(said("\ufeff".encode()), CHAT, CHAT, id="bom-in-text-is-not-blank"),
    pytest.param(chat(U, answer(b'" x"')), CHAT, CHAT, id="visible-near-line-end"),
    # What the scanner leaves to msgspec and the rules (valid or not).
    pytest.param(BOM + chat(U, A), None, "invalid:not_json", id="bom"),
    pytest.param(chat(U), None, rules.PROMPT_MESSAGES, id="no-answer"),
    pytest.param(
        chat(U, answer(extra=b',"weight":0')), None, "invalid:missing_assistant_message", id="untrained"
    ),
    pytest.param(b'{"messages":[]}', None, "invalid:missing_field", id="no-messages"),
    pytest.param(chat(U, A)[:-1] + b',"x":1}', None, CHAT, id="extra-top-level-key"),
    pytest.param(b'{"x":1,' + chat(U, A)[1:], None, CHAT, id="messages-not-first"),
    pytest.param(
        chat(U, A)[:-1] + b',"messages":[' + U + b"]}", None, rules.PROMPT_MESSAGES, id="messages-twice"
    ),
    pytest.param(b'{"prompt":"p","completion":"c"}', None, rules.PROMPT_COMPLETION, id="other-format"),
    pytest.param(b'{"m\\u0065ssages":[' + U + b"," + A + b"]}", None, CHAT, id="escaped-top-key"),
    pytest.param(chat(user(extra=b',"x":1'), A), None, "invalid:unknown_key", id="unknown-key"),
    pytest.param(chat(user(extra=b',"role":"user"'), A), None, CHAT, id="role-twice"),
    pytest.param(chat(user(extra=b',"content":"x"'), A), None, CHAT, id="content-twice"),
    pytest.param(chat(b'{"role":"us\\u0065r","content":"hi"}', A), None, CHAT, id="escaped-role"),
    pytest.param(chat(b'{"r\\u006fle":"user","content":"hi"}', A), None, CHAT, id="escaped-key"),
    pytest.param(
        chat(b'{"role":"wizard","content":"hi"}', A), None, "invalid:invalid_role", id="unknown-role"
    ),
    pytest.param(chat(b'{"content":"hi"}', A), None, "invalid:missing_field", id="no-role"),
    pytest.param(said(b""), None, "invalid:empty_content", id="empty-text"),
    pytest.param(said(b" " * 40), None, "invalid:empty_content", id="blank-text"),
    pytest.param(
        said("\u3000\u00a0\u2028\u0085".encode()), None, "invalid:empty_content", id="unicode-blank"
    ),
    pytest.param(said(b"\\n\\t\\u3000\\u0020"), None, "invalid:empty_content", id="escaped-blank"),
    pytest.param(
        said("\u1680\u2000\u200a\u2029\u202f\u205f".encode()),
        None,
        "invalid:empty_content",
        id="more-unicode-blank",
    ),
    pytest.param(
        said(b"\\u001c\\u001d\\u001e\\u001f\\u000b\\u000c\\u0085"),
        None,
        "invalid:empty_content",
        id="escaped-separators",
    ),
    pytest.param(chat(U, answer(b'"  "')), None, "invalid:empty_content", id="blank-near-line-end"),
    pytest.param(
        chat(U, calls(content=b',"content":"  "')), None, "invalid:empty_content", id="call-blank-text"
    ),
    pytest.param(chat(U, calls(content=b',"content":""')), None, CHAT, id="call-empty-text"),
    pytest.param(chat(U, calls(content=b',"content":[]')), None, "invalid:empty_content", id="call-no-parts"),
    pytest.param(
        chat(U, calls(content=b',"content":[{"type":"text","text":"hi"}]')), None, CHAT, id="call-parts"
    ),
    pytest.param(said(b"\\ud83d\\ude00"), None, CHAT, id="surrogate-pair"),
    pytest.param(said(b"x\\ud800"), None, CHAT, id="lone-surrogate"),
    pytest.param(said(b"x\\x41"), None, "invalid:not_json", id="bad-escape"),
    pytest.param(said(b"x\\u12"), None, "invalid:not_json", id="short-escape"),
    pytest.param(chat(user(b"null"), A), None, "invalid:missing_field", id="null-text"),
    pytest.param(chat(b'{"role":"user"}', A), None, "invalid:missing_field", id="no-text"),
    pytest.param(chat(user(b'[{"type":"text","text":"hi"}]'), A), None, CHAT, id="content-parts"),
    pytest.param(chat(user(b"5"), A), None, "invalid:invalid_type", id="number-text"),
    pytest.param(chat(U, answer(b"null")), None, "invalid:missing_field", id="answer-null-no-calls"),
    pytest.param(chat(user(extra=b',"name":7'), A), None, "invalid:invalid_type", id="name-not-a-string"),
    pytest.param(chat(user(extra=b',"weight":1'), A), None, "invalid:invalid_weight", id="weight-on-user"),
    pytest.param(chat(U, answer(extra=b',"weight":1.0')), None, "invalid:invalid_weight", id="weight-1.0"),
    pytest.param(chat(U, answer(extra=b',"weight":true')), None, "invalid:invalid_weight", id="weight-true"),
    pytest.param(chat(U, answer(extra=b',"weight":01')), None, "invalid:not_json", id="weight-01"),
    pytest.param(chat(U, answer(extra=b',"weight":-0'), A), None, CHAT, id="weight-minus-0"),
    pytest.param(chat(U, answer(extra=b',"weight":"1"')), None, "invalid:invalid_weight", id="weight-string"),
    pytest.param(chat(U, answer(extra=b',"weight":2')), None, "invalid:invalid_weight", id="weight-2"),
    pytest.param(
        chat(user(extra=b',"tool_calls":[' + call() + b"]"), A),
        None,
        "invalid:invalid_tool_call",
        id="user-calls",
    ),
    pytest.param(
        chat(U, answer(extra=b',"tool_calls":[]')), None, "invalid:invalid_tool_call", id="no-calls"
    ),
    pytest.param(chat(U, calls(call(b'"c\\u0031"')), result()), None, CHAT_OR_PROMPT, id="escaped-call-id"),
    pytest.param(chat(U, calls(), result(b'"c\\u0031"')), None, CHAT_OR_PROMPT, id="escaped-result-id"),
    pytest.param(chat(U, calls(call(b'""'))), None, "invalid:invalid_tool_call", id="empty-call-id"),
    pytest.param(chat(U, calls(b'{"id":"c1"}')), None, "invalid:invalid_tool_call", id="no-function"),
    pytest.param(
        chat(U, calls(call().replace(b'"function",', b'"tool",'))),
        None,
        "invalid:invalid_tool_call",
        id="type-tool",
    ),
    pytest.param(chat(U, calls(call(extra=b',"index":0'))), None, CHAT, id="call-extra-key"),
    pytest.param(
        chat(U, calls(call(function=b'{"name":"f","arguments":{}}'))),
        None,
        "invalid:invalid_tool_call",
        id="args-object",
    ),
    pytest.param(
        chat(U, calls(call(function=b'{"name":"","arguments":""}'))),
        None,
        "invalid:invalid_tool_call",
        id="empty-fn-name",
    ),
    pytest.param(
        chat(U, calls(call(function=b'{"name":"f"}'))), None, "invalid:invalid_tool_call", id="no-arguments"
    ),
    pytest.param(chat(U, calls(*[call(b'"c%d"' % i) for i in range(65)])), None, CHAT, id="65-calls"),
    pytest.param(
        chat(U, calls(), result(b'"c2"')), None, "invalid:invalid_tool_call", id="result-for-no-call"
    ),
    pytest.param(chat(U, result(), calls()), None, "invalid:invalid_tool_call", id="result-before-call"),
    pytest.param(
        chat(U, calls(), b'{"role":"tool","content":"42"}'), None, "invalid:missing_field", id="no-call-id"
    ),
    pytest.param(chat(user(extra=b',"tool_call_id":"c1"'), A), None, CHAT, id="call-id-on-user"),
    pytest.param(said(b"a\xc0\x80"), None, "invalid:not_utf8", id="overlong"),
    pytest.param(said(b"a\xed\xa0\x80"), None, "invalid:not_utf8", id="utf8-surrogate"),
    pytest.param(said(b"a\xf5\x80\x80\x80"), None, "invalid:not_utf8", id="f5"),
    pytest.param(said(b"a\xe3\x80"), None, "invalid:not_utf8", id="truncated"),
    pytest.param(said(b"a" * 20 + b"\x01"), None, "invalid:not_json", id="control-byte"),
    pytest.param(chat(U, A).replace(b",", b",\x0b", 1), None, "invalid:not_json", id="vt-between-tokens"),
    pytest.param(
        chat(U, A).replace(b",", b",\xc2\xa0", 1), None, "invalid:not_json", id="nbsp-between-tokens"
    ),
    pytest.param(chat(U, A) + b"\x00", None, "invalid:not_json", id="nul-after"),
    pytest.param(chat(U, A) + b"}", None, "invalid:not_json", id="garbage-after"),
    pytest.param(chat(U, A)[:-2] + b",]}", None, "invalid:not_json", id="trailing-comma"),
    pytest.param(chat(U, A)[:-1], None, "invalid:not_json", id="truncated-line"),
    pytest.param(b"[" + chat(U, A) + b"]", None, "invalid:not_object", id="array"),
    pytest.param(b"", None, "invalid:not_json", id="blank-line"),
]


@needs_scanner
@pytest.mark.parametrize(("line", "expected", "reference"), CASES)
def test_scanner_verdicts(line: bytes, expected: str | None, reference: str) -> None:
    """Each rule the scanner proves a line valid by, and each reason it must stay unsure (with
    what the rules say of that line, so that a case cannot silently stop testing anything)."""
    assert verdict(line) == expected
    assert reference_kind(line) == reference
    assert_sound(line, 1, 1)


@needs_scanner
@pytest.mark.parametrize(
    "block",
    [
        b"",
        b"\n",
        b"\r\n",
        b"\n\n",
        b" ",
        b"\x0c\n",
        BOM,
        BOM + b"\n",
        chat(U, A),
        chat(U, A) + b"\r\n" + chat(U, A, U),
    ],
)
def test_edge_blocks(block: bytes) -> None:
    """The empty block is one empty line, as fast.split_lines has it; a final newline adds none."""
    assert_sound(block, 1, 1)
    assert fast.classify(block, 1, 0, native=True).n == len(fast.split_lines(block))


def assert_lines_sound(lines: list[bytes]) -> None:
    """``assert_sound`` for many lines at once (one block), naming the lines that fail."""
    block = b"\n".join(lines) + b"\n"
    if fast.classify(block, 1, 1, native=True) != fast.classify(block, 1, 1, native=False):
        for line in lines:
            assert_sound(line, 1, 1)  # names the line
        raise AssertionError("classify disagrees on the block, yet on no line alone")
    kinds = scan(block)[0]
    wrong = [
        (line, kind, reference_kind(line))
        for line, kind in zip(lines, kinds, strict=True)
        if kind is not None
    ]
    wrong = [(line, kind, ref) for line, kind, ref in wrong if ref != kind]
    assert not wrong, (
        f"{len(wrong)} lines the scanner vouches for wrongly (line, scanner, rules): {wrong[:5]}"
    )


@needs_scanner
@pytest.mark.parametrize("where", ["prompt", "answer"])
def test_every_oddity_at_every_offset(where: str) -> None:
    """Each odd byte sequence, escape or blank character at every offset mod 16 of a string (the
    scanner reads 16 bytes at a time), after plain text or spaces, in the first message or the
    last one (whose string ends within 16 bytes of the line end, read byte by byte)."""
    lines = []
    for oddity in [*ODDITIES, b"x", b" ", b"\x7f"]:
        for lead in (b"a", b" "):
            for offset in range(34):
                for tail in (b"", b"  ", b"z"):
                    text = b'"' + lead * offset + oddity + tail + b'"'
                    lines.append(chat(user(text), A) if where == "prompt" else chat(U, answer(text)))
    assert_lines_sound(lines)


ROLE_NAMES = [b"system", b"developer", b"user", b"assistant", b"tool"]
MEMBERS = [
    *[b'"weight":' + w for w in (b"0", b"1", b"1.0", b"true", b"-0", b"01", b'"1"', b"2", b"null", b"0e0")],
    *[b'"name":' + n for n in (b'""', b'"bob"', b'"\\u00e9"', b"7", b"null", b"[]")],
    *[b'"tool_calls":' + c for c in (b"[" + call() + b"]", b"[]", b"null", b"{}", b'[{"id":"c9"}]')],
    *[b'"tool_call_id":' + i for i in (b'"c1"', b'"c2"', b'"c\\u0031"', b'""', b"1", b"null")],
    b'"content":null',
    b'"content":""',
    b'"content":[]',
    b'"x":1',
    *[
        b'"tool_calls":[' + call() + b'],"content":' + content
        for content in (b"null", b'""', b'"  "', b"[]", b'[{"type":"text","text":"hi"}]', b"0", b'"x"')
    ],
]


@needs_scanner
def test_every_member_on_every_role() -> None:
    """Weights, names, tool calls and call ids, valid or not, on every role, with and without
    text, after a call that ``c1`` answers."""
    lines = []
    for role in ROLE_NAMES:
        for member in MEMBERS:
            for text in (b'"content":"hi",', b""):
                message = b'{"role":"' + role + b'",' + text + member + b"}"
                lines += [chat(U, calls(), message), chat(U, calls(), message, A), chat(message, A)]
    assert_lines_sound(lines)


@needs_scanner
@pytest.mark.parametrize("escaped", [False, True])
def test_every_code_point_alone(escaped: bool) -> None:
    """A text of one character (raw UTF-8 of every code point, or its \\u escape) is valid
    exactly when str.isspace() says it is not blank: the scanner's own whitespace table and
    UTF-8 decoding against Python's."""
    last = 0xFFFF if escaped else 0x10FFFF
    for plane in range(0, last, 1 << 16):
        points = [
            c for c in range(max(plane, 0x20), min(plane + (1 << 16), last + 1)) if not 0xD800 <= c <= 0xDFFF
        ]
        points = [c for c in points if c not in (0x22, 0x5C)]  # a quote or backslash ends or escapes the text
        texts = [b"\\u%04x" % c if escaped else chr(c).encode() for c in points]
        lines = [chat(answer(b'"' + b" " * (c % 17) + t + b'"')) for c, t in zip(points, texts, strict=True)]
        kinds = scan(b"\n".join(lines), 1 << 62)[0]
        blank = [
            chr(c) for c, kind in zip(points, kinds, strict=True) if kind is not None and chr(c).isspace()
        ]
        assert not blank, f"the scanner vouches for blank texts: {blank[:10]!r}"
        missed = [
            hex(c) for c, kind in zip(points, kinds, strict=True) if kind is None and not chr(c).isspace()
        ]
        assert not missed, f"valid texts the scanner leaves to msgspec: {missed[:10]}"


# --- 3. Lines, keys and sizes of arbitrary bytes ----------------------------------------------

NEWLINE_RICH = st.lists(
    st.one_of(
        st.sampled_from(
            [b"\n", b"\r\n", b"\r", b" ", b"\t", b"\x0b", b"\x0c", b"\x1c", b"\x00", b"\xff", b"{", b"}"]
        ),
        st.binary(max_size=40),
        chat_lines(),
    ),
    max_size=40,
).map(b"".join)


def expected_scan(block: bytes, trained_stride: int, sample_stride: int, kinds: list) -> tuple:
    """What ``scan`` must give besides the kinds, from ``fast.split_lines``, ``bytes.strip`` and
    ``xxhash`` (``kinds``: the scanner's own, which the other properties check)."""
    lines = fast.split_lines(block)
    stripped = [line.strip() for line in lines]
    keys = list(map(xxhash.xxh3_64_intdigest, stripped))
    unsure = {i: lines[i] for i, kind in enumerate(kinds) if kind is None}
    chosen = {
        i: lines[i]
        for i, kind in enumerate(kinds)
        if kind is not None
        and (keys[i] % trained_stride == 0 or (sample_stride and keys[i] % sample_stride == 0))
    }
    return len(lines), keys, list(map(len, stripped)), max(map(len, lines)), unsure, chosen


@needs_scanner
@PROPERTY
@given(
    block=st.one_of(
        st.binary(max_size=3000), NEWLINE_RICH, st.sampled_from([b"", b"\n", b"\n\n", b"\r\n", b"x", b"x\ny"])
    ),
    strides=STRIDES,
)
def test_lines_keys_and_sizes_of_any_bytes(block: bytes, strides: tuple[int, int]) -> None:
    """The books (line count, keys, sizes, the longest line, which lines go on) must be the
    Python path's exactly, for any bytes: a wrong key breaks duplicates and sampling."""
    kinds, keys, sizes, longest, unsure, chosen = scan(block, *strides)
    assert (len(kinds), keys, sizes, longest, unsure, chosen) == expected_scan(block, *strides, kinds)
    assert all(kind in (None, CHAT, CHAT_OR_PROMPT) for kind in kinds)


@needs_scanner
@pytest.mark.parametrize("size", [0, 1, 3, 4, 8, 9, 16, 17, 128, 129, 240, 241, 1024, 1025, 4096, 100_003])
def test_keys_at_every_xxh3_size_class(size: int) -> None:
    """xxh3 takes a different route per input size; every route must match xxhash's."""
    data = bytes(random.Random(size).choices(range(0x21, 0x7F), k=size))  # no whitespace, no newline
    assert scan(data)[1] == [xxhash.xxh3_64_intdigest(data)]


# --- 4. No leaks ------------------------------------------------------------------------------


def leak_block() -> bytes:
    """More than 256 lines (so indices are not cached small ints), unsure and valid ones."""
    lines = [chat(U, answer(b'"a%d"' % i)) if i % 3 else b"not json %d" % i for i in range(600)]
    lines += [chat(U, A, U), b"", said(b"\\u00e9")]
    return b"\n".join(lines) + b"\n"


@needs_scanner
def test_scan_leaks_no_references_or_memory() -> None:
    """A missing DECREF in the C code would keep the kind objects (and the results) alive."""
    block = leak_block()
    chat_kind, prompt_kind = "".join(["ch", "at?"]), "".join(["chat_or_", "prompt?"])  # not interned
    kinds, _, _, _, unsure, chosen = fast._linescan.scan(block, chat_kind, prompt_kind, 1, 0)
    assert chat_kind in kinds and prompt_kind in kinds and unsure and chosen
    del kinds, unsure, chosen
    gc.collect()
    refs = sys.getrefcount(chat_kind), sys.getrefcount(prompt_kind)

    def run(times: int) -> None:
        for trained_stride in range(1, times + 1):
            fast._linescan.scan(block, chat_kind, prompt_kind, trained_stride, 0)
            fast._linescan.scan(block, chat_kind, prompt_kind, 3, trained_stride)

    run(5)
    gc.collect()
    assert (sys.getrefcount(chat_kind), sys.getrefcount(prompt_kind)) == refs
    tracemalloc.start()
    try:
        run(5)  # warm up
        gc.collect()
        start = tracemalloc.get_traced_memory()[0]
        run(100)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, f"{grown} bytes more after 200 scans of {len(block)} bytes: a leak"
    assert (sys.getrefcount(chat_kind), sys.getrefcount(prompt_kind)) == refs


@needs_scanner
@pytest.mark.parametrize(
    ("block", "strides"),
    [
        (bytearray(b"{}\n"), (1, 0)),  # the scan runs without the GIL: a mutable buffer could change
        (memoryview(b"{}\n"), (1, 0)),
        ("{}\n", (1, 0)),
        (b"{}\n", (0, 0)),
        (b"{}\n", (1, -1)),
        (b"{}\n", (-1, 0)),
    ],
)
def test_scan_refuses_what_it_cannot_read_safely(block: object, strides: tuple[int, int]) -> None:
    """Only bytes (immutable while the GIL is released), and strides it can divide by."""
    with pytest.raises((TypeError, ValueError)):
        fast._linescan.scan(block, CHAT, CHAT_OR_PROMPT, *strides)


# --- 5. Built wherever it can be --------------------------------------------------------------


def test_scanner_is_built() -> None:
    """setup.py builds the scanner as optional: a failed build still installs, silently slower.
    Where a compiler and Python's headers exist, it must have been built."""
    cc = (sysconfig.get_config_var("CC") or "").split()
    include = Path(sysconfig.get_paths()["include"])
    if not cc or shutil.which(cc[0]) is None:
        pytest.skip(f"no C compiler ({cc[0] if cc else 'CC unset'}): validation runs without the C scanner")
    if not (include / "Python.h").exists():
        pytest.skip(f"no Python.h in {include}: validation runs without the C scanner")
    assert fast.NATIVE, (
        "a C compiler and Python.h are here, but the C scanner (tuneforge_api.validation._linescan) "
        f"is {'not built' if fast._linescan is None else 'built, but msgspec is missing'}: rebuild it with "
        "`.venv/bin/pip install --no-deps --no-build-isolation -e ./api`"
    )
    # A failed rebuild (optional=True) leaves the previous build in place: it must not be older
    # than the source it was built from.
    built = Path(fast._linescan.__file__)
    native = built.parent / "native"
    if native.is_dir():  # an editable install, built next to its source
        newest = max(p.stat().st_mtime for p in native.iterdir() if p.suffix in {".c", ".h"})
        assert built.stat().st_mtime >= newest, (
            f"{built.name} is older than its source in {native}: the last rebuild failed; rebuild "
            "with `.venv/bin/pip install --no-deps --no-build-isolation -e ./api` and read its errors"
        )
