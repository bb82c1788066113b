"""Preference data for reward_model and dpo: K-way expansion, weights, formats, and per-line errors."""

from __future__ import annotations

import json
import math
from itertools import combinations
from typing import Any

import pytest

from tests.trainer.synthetic import jsonl, marker_pairs, marker_rankings
from tuneforge_trainer.data import DataError
from tuneforge_trainer.preference_data import (
    expand_ranking,
    normalize_weights,
    one_schema,
    parse_preference_lines,
)

USER = [{"role": "user", "content": "Capital?"}]
PAIR = {"prompt": "Capital?", "chosen": "Forgeville.", "rejected": "Tunish."}


def lines(*rows: Any) -> list[bytes]:
    return [r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows]


def parse(*rows: Any, rankings: bool = True) -> Any:
    return parse_preference_lines(lines(*rows), allow_rankings=rankings)


def problems_of(*rows: Any, rankings: bool = True) -> list[tuple[int | None, str]]:
    with pytest.raises(DataError) as info:
        parse(*rows, rankings=rankings)
    return [(p.line, p.code) for p in info.value.problems]


# --- K-way expansion (pure) ---------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3, 4, 7])
def test_expansion_makes_every_ordered_pair_once(k: int) -> None:
    responses = [f"r{i}" for i in range(k)]
    ranking = list(reversed(range(k)))  # r{k-1} is best
    pairs = expand_ranking(responses, ranking)
    assert len(pairs) == k * (k - 1) // 2
    ranked = [responses[i] for i in ranking]
    # Every (better, worse) pair of the ranking, in rank order: (1st,2nd), (1st,3rd), ..., (2nd,3rd), ...
    assert [(b, w) for b, w, _ in pairs] == list(combinations(ranked, 2))
    assert all(ranked.index(b) < ranked.index(w) for b, w, _ in pairs)
    # InstructGPT: one prompt's pairs together weigh as one example.
    assert all(weight == pytest.approx(1 / math.comb(k, 2)) for _, _, weight in pairs)
    assert sum(weight for _, _, weight in pairs) == pytest.approx(1.0)


def test_ranking_best_first_follows_the_indices() -> None:
    pairs = expand_ranking(["a", "b", "c"], [2, 0, 1])  # c > a > b
    assert [(b, w) for b, w, _ in pairs] == [("c", "a"), ("c", "b"), ("a", "b")]


def test_k2_ranking_equals_a_pair() -> None:
    assert expand_ranking(["good", "bad"], [0, 1]) == [("good", "bad", 1.0)]
    ranked = parse({"prompt": "Capital?", "responses": ["Tunish.", "Forgeville."], "ranking": [1, 0]})
    assert ranked.records == parse(PAIR).records
    assert ranked.records[0]["weight"] == 1.0


@pytest.mark.parametrize(
    ("responses", "ranking"),
    [
        (["a", "b", "c"], [0]),
        (["a", "b"], [0, 0]),
        (["a", "b"], [0, 2]),
        (["a"], [0]),
        (["a", "b"], [1, 0, 2]),
    ],
)
def test_expansion_refuses_what_is_not_a_ranking(responses: list[str], ranking: list[int]) -> None:
    with pytest.raises(ValueError):
        expand_ranking(responses, ranking)


def test_weights_are_normalized_to_mean_one() -> None:
    assert normalize_weights([1.0, 1.0]) == [1.0, 1.0]  # a pairs-only file trains as plain TRL does
    assert normalize_weights([]) == []
    # One pair (weight 1) and one K=3 ranking (3 pairs of 1/3): each prompt's total stays equal.
    weights = normalize_weights([1.0, 1 / 3, 1 / 3, 1 / 3])
    assert sum(weights) / len(weights) == pytest.approx(1.0)
    assert weights[0] == pytest.approx(sum(weights[1:]))


def test_file_of_pairs_and_rankings_carries_per_prompt_weights() -> None:
    data = parse(PAIR, {"messages": USER, "responses": ["A.", "B.", "C.", "D."], "ranking": [3, 2, 1, 0]})
    assert (data.n_examples, len(data)) == (2, 7)
    weights = [r["weight"] for r in data.records]
    assert sum(weights) == pytest.approx(len(weights))
    assert weights[0] == pytest.approx(sum(weights[1:]))  # the pair weighs as much as the 6 ranked pairs
    assert data.format == "conversational"  # one schema: the plain pair became chat messages
    assert data.records[0] == {
        "prompt": [{"role": "user", "content": "Capital?"}],
        "chosen": [{"role": "assistant", "content": "Forgeville."}],
        "rejected": [{"role": "assistant", "content": "Tunish."}],
        "weight": pytest.approx(weights[0]),
    }
    assert data.records[1]["chosen"] == [{"role": "assistant", "content": "D."}]


# --- formats --------------------------------------------------------------------------------


def test_plain_text_pairs_stay_plain_and_dpo_gets_no_weights() -> None:
    data = parse(PAIR, PAIR, rankings=False)
    assert data.format == "standard"
    assert data.records == [PAIR, PAIR]
    assert not data.weighted


def test_messages_prompt_and_assistant_message_answers() -> None:
    row = {
        "messages": [{"role": "system", "content": "Be brief."}, *USER],
        "chosen": [{"role": "assistant", "content": "Forgeville."}],
        "rejected": "Tunish.",
    }
    record = parse(row, rankings=False).records[0]
    assert record["prompt"] == row["messages"]
    assert record["chosen"] == row["chosen"]
    assert record["rejected"] == [{"role": "assistant", "content": "Tunish."}]


def test_training_and_validation_files_share_one_schema() -> None:
    plain, chat = parse(PAIR), parse({**PAIR, "prompt": USER})
    train, valid = one_schema(plain, chat)
    assert train.format == valid.format == "conversational"
    assert one_schema(plain, None) == (plain, None)


def test_synthetic_files_are_valid() -> None:
    assert len(parse_preference_lines(jsonl(marker_pairs(8, 0)).splitlines(), allow_rankings=False)) == 8
    ranked = parse_preference_lines(jsonl(marker_rankings(4, 0, k=4)).splitlines(), allow_rankings=True)
    assert (ranked.n_examples, len(ranked)) == (4, 24)
    assert all("Forgeville" in r["chosen"][0]["content"] for r in ranked.records[::6])


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "code"),
    [
        (b"{nope", "not_json"),
        ([1], "not_object"),
        ({"prompt": "Q", "rejected": "x"}, "missing_field"),  # no chosen
        ({"prompt": "Q", "chosen": "x"}, "missing_field"),  # no rejected
        ({"chosen": "x", "rejected": "y"}, "missing_field"),  # no prompt or messages
        ({"prompt": "Q", "responses": ["only one"], "ranking": [0]}, "too_few_responses"),
        ({"prompt": "Q", "responses": [], "ranking": []}, "too_few_responses"),
        ({"prompt": "Q", "responses": ["a", "b"], "ranking": [0, 0]}, "invalid_ranking"),
        ({"prompt": "Q", "responses": ["a", "b"], "ranking": [1, 2]}, "invalid_ranking"),
        ({"prompt": "Q", "responses": ["a", "b"], "ranking": [True, False]}, "invalid_ranking"),
        ({"prompt": "Q", "responses": ["a", "b"]}, "missing_field"),
        ({"prompt": "Q", "chosen": " ", "rejected": "y"}, "empty_content"),
        ({"prompt": "Q", "chosen": [{"role": "assistant", "content": ""}], "rejected": "y"}, "empty_content"),
        ({"messages": [{"role": "user", "content": ""}], "chosen": "x", "rejected": "y"}, "empty_content"),
        ({"prompt": "Q", "responses": ["a", " "], "ranking": [0, 1]}, "empty_content"),
        ({"prompt": "Q", "chosen": [{"role": "user", "content": "x"}], "rejected": "y"}, "invalid_role"),
        ({"prompt": "Q", "chosen": 3, "rejected": "y"}, "invalid_content"),
        ({"prompt": 3, "chosen": "x", "rejected": "y"}, "invalid_prompt"),
    ],
)
def test_each_bad_line_has_a_stable_code_and_its_line(row: Any, code: str) -> None:
    assert problems_of(PAIR, row, PAIR) == [(2, code)]


def test_dpo_takes_pairs_not_rankings() -> None:
    ranked = {"prompt": "Q", "responses": ["a", "b"], "ranking": [0, 1]}
    assert problems_of(PAIR, ranked, rankings=False) == [(2, "unsupported_format")]


def test_validation_file_errors_name_the_validation_file() -> None:
    with pytest.raises(DataError) as info:
        parse_preference_lines(lines(b"", b" "), allow_rankings=True, param="validation_file")
    assert info.value.code == "invalid_validation_file"
    assert info.value.param == "validation_file"
    assert info.value.message == "validation file has 1 problem: the file has no examples (empty_file)"
