"""SFT options on the real tiny model: train_on_inputs (the labels mask), packing (padding-free,
fewer and fuller sequences, no attention across examples), and max_seq_length truncation
reported as an event."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tuneforge.types import JobSpec

if TYPE_CHECKING:
    from tests.trainer.conftest import EventSink, TrainerJob

REPO = Path(__file__).resolve().parents[2]
DEMO_LINES = (REPO / "examples" / "demo_chat.jsonl").read_bytes().splitlines()
IGNORE = -100
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def sft_spec(tmp_path: Path, **hyperparameters: Any) -> JobSpec:
    hp = {"n_epochs": 1, "batch_size": 4, **hyperparameters}
    return JobSpec.model_validate(
        {
            "job_id": "ftjob-options",
            "project_id": "p",
            "attempt": 1,
            "base_model": "tuneforge/tiny-llama",
            "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
            "lora": {"r": 4, "alpha": 8},
            "training_file_key": "k",
            "storage_uri": tmp_path.as_uri(),
            "api_base_url": "http://127.0.0.1:9",
        }
    )


def build(tmp_path: Path, tiny_model_dir: Path, lines: list[bytes], **hyperparameters: Any) -> Any:
    from tuneforge_trainer.data import parse_sft_lines
    from tuneforge_trainer.sft import build_sft_trainer
    from tuneforge_trainer.training import RunContext

    ctx = RunContext(
        spec=sft_spec(tmp_path, **hyperparameters), base_model_dir=tiny_model_dir, work_dir=tmp_path
    )
    trainer, _ = build_sft_trainer(ctx, parse_sft_lines(lines))
    return trainer


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """``(input_ids, assistant mask)`` straight from the chat template's generation markers."""
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return out["input_ids"], out["assistant_masks"]


@pytest.mark.parametrize("data_format", ["messages", "prompt_completion"])
def test_train_on_inputs_sets_the_labels_mask_both_ways(
    data_format: str, tmp_path: Path, tiny_model_dir: Path
) -> None:
    lines = DEMO_LINES[:4]
    if data_format == "prompt_completion":
        chats = [json.loads(line)["messages"] for line in lines]
        lines = [
            json.dumps({"prompt": c[-2]["content"], "completion": " " + c[-1]["content"]}).encode()
            for c in chats
        ]
    default = build(tmp_path / "a", tiny_model_dir, lines).train_dataset
    everything = build(tmp_path / "b", tiny_model_dir, lines, train_on_inputs=True).train_dataset
    tokenizer = build(tmp_path / "c", tiny_model_dir, lines[:1]).processing_class

    for i, line in enumerate(lines):
        ids, labels = default[i]["input_ids"], default[i]["labels"]
        assert everything[i]["input_ids"] == ids
        # train_on_inputs: every token is a label.
        assert everything[i]["labels"] == ids
        # Default: the prompt is masked out, the answer is kept, token for token.
        trained = [label != IGNORE for label in labels]
        assert 0 < sum(trained) < len(ids)
        assert all(label in (IGNORE, token) for label, token in zip(labels, ids, strict=True))
        if data_format == "messages":
            template_ids, mask = assistant_spans(tokenizer, json.loads(line)["messages"])
            assert template_ids == ids
            assert trained == [bool(m) for m in mask]
        else:
            completion = json.loads(line)["completion"]
            assert trained[0] is False and trained[-1] is True  # prompt first, answer (and EOS) last
            answer = tokenizer.decode([t for t, k in zip(ids, trained, strict=True) if k])
            assert answer == completion + tokenizer.eos_token  # the completion and EOS, nothing else


def test_packing_gives_fewer_fuller_sequences_without_cross_attention(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    lines = DEMO_LINES[:32]
    plain = build(tmp_path / "plain", tiny_model_dir, lines, max_seq_length=256)
    packed = build(tmp_path / "packed", tiny_model_dir, lines, max_seq_length=256, packing=True)
    before, after = plain.prepared["train"], packed.prepared["train"]
    assert before.sequences == 32 and before.fill < 0.2  # one example per row: mostly padding
    assert after.sequences < before.sequences / 4  # fewer ...
    assert after.fill > 4 * before.fill  # ... and fuller rows
    assert after.tokens == before.tokens  # nothing lost: every example fits whole
    rows = packed.train_dataset
    assert sum(len(r["input_ids"]) for r in rows) == before.tokens
    assert all(len(r["input_ids"]) <= 256 for r in rows)
    assert sorted(n for r in rows for n in r["seq_lengths"]) == sorted(
        len(r["input_ids"]) for r in plain.train_dataset
    )

    # Padding-free: TRL's collator flattens a batch into one row with per-example position_ids
    # and no attention mask; transformers' sdpa and eager then attend only within each example.
    batch = packed.data_collator([rows[0]])
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    bounds = [*starts, batch["input_ids"].shape[1]]
    for implementation in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(
            tiny_model_dir, attn_implementation=implementation
        ).eval()
        with torch.no_grad():
            # use_cache=False, as SFTTrainer's compute_loss passes: with a cache, packing is not detected.
            packed_row = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
            together = model(**packed_row, use_cache=False).logits[0]
            for start, end in zip(bounds, bounds[1:], strict=False):
                alone = model(input_ids=batch["input_ids"][:, start:end]).logits[0]
                torch.testing.assert_close(together[start:end], alone, atol=1e-5, rtol=1e-4)


def test_packed_sft_trains_in_process(tmp_path: Path, tiny_model_dir: Path) -> None:
    from tuneforge_trainer.data import parse_sft_lines
    from tuneforge_trainer.sft import train_sft
    from tuneforge_trainer.training import RunContext

    # 64 examples packed into rows of 128 tokens, 2 rows per step.
    spec = sft_spec(tmp_path, n_epochs=6, batch_size=2, packing=True, max_seq_length=128)
    ctx = RunContext(spec=spec, base_model_dir=tiny_model_dir, work_dir=tmp_path / "w")
    metrics = train_sft(ctx, parse_sft_lines(DEMO_LINES))
    assert metrics["final_loss"] < metrics["first_loss"]
    packed = build(tmp_path / "t", tiny_model_dir, DEMO_LINES, max_seq_length=128, packing=True)
    rows = packed.prepared["train"].sequences
    assert rows < 64 / 2  # at least two examples per row on average
    assert metrics["steps"] == 6 * math.ceil(rows / 2)  # steps count packed rows, 2 per step
    assert metrics["trained_tokens"] == 6 * packed.prepared["train"].tokens  # real tokens, no padding
    assert (ctx.adapter_dir / "adapter_model.safetensors").is_file()


def test_truncation_is_reported_as_an_event(
    tmp_path: Path,
    tiny_model_dir: Path,
    event_sink: EventSink,
    make_job: Callable[..., TrainerJob],
    run_trainer: Callable[[TrainerJob], Any],
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    long_answer = {
        "messages": [
            {"role": "user", "content": "Tell me about Tuneland."},
            {"role": "assistant", "content": "Tuneland is a land of songs and forges. " * 6},
        ]
    }
    lines = [*DEMO_LINES[:15], json.dumps(long_answer).encode()]
    lengths = [
        len(
            tokenizer.apply_chat_template(json.loads(x)["messages"], tokenize=True, return_dict=True)[
                "input_ids"
            ]
        )
        for x in lines
    ]
    limit = sorted(lengths)[-3] - 1
    longer = sum(n > limit for n in lengths)  # counted here from the chat template, independently
    assert 3 <= longer < len(lines)
    method = {
        "type": "supervised",
        "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4, "max_seq_length": limit}},
    }
    job = make_job(tmp_path, b"\n".join(lines), event_sink.url, method=method)
    result = run_trainer(job)
    assert result.returncode == 0, result.stderr[-3000:]

    reports = [e for e in event_sink.events(job.job_id) if "truncated_examples" in (e.get("data") or {})]
    assert len(reports) == 1
    report = reports[0]
    assert report["level"] == "warn"
    assert report["data"]["file"] == "training_file"
    assert report["data"]["truncated_examples"] == longer
    assert report["data"]["max_truncated_tokens"] == max(lengths) - limit
    assert report["data"]["max_seq_length"] == limit
    expected = f"{longer} of 16 examples in the training file are longer than max_seq_length={limit} tokens"
    assert report["message"].startswith(expected)
    assert report["message"] in result.stdout


def test_options_map_to_trl_config_purely(tmp_path: Path) -> None:
    from tuneforge_trainer import config_mapping as cm

    hp = cm.ResolvedHyperparameters(1, 4, 1.0)

    def kwargs(data_format: str, **options: Any) -> dict[str, Any]:
        return cm.sft_config_kwargs(
            sft_spec(tmp_path, **options), hp, output_dir="o", data_format=data_format, max_length=256
        )

    default = kwargs("messages")
    assert (default["assistant_only_loss"], default["completion_only_loss"], default["packing"]) == (
        True,
        None,
        False,
    )
    assert "padding_free" not in default
    assert kwargs("messages", train_on_inputs=True)["assistant_only_loss"] is False
    assert kwargs("prompt_completion")["completion_only_loss"] is True
    assert kwargs("prompt_completion", train_on_inputs=True)["completion_only_loss"] is False
    packed = kwargs("messages", packing=True)
    assert (packed["packing"], packed["packing_strategy"], packed["padding_free"]) == (True, "bfd", True)
    assert packed["max_length"] == 256


def test_full_fine_tuning_has_its_own_learning_rates(tmp_path: Path) -> None:
    from tuneforge_trainer import config_mapping as cm

    lora = sft_spec(tmp_path)
    full = lora.model_copy(
        update={
            "method": lora.method.model_copy(
                update={"supervised": lora.method.supervised.model_copy(update={"adapter": "full"})}
            )
        }
    )
    assert (cm.adapter_kind(lora), cm.adapter_kind(full)) == ("lora", "full")
    assert cm.base_learning_rate(full) == cm.TINY_MODEL_FULL_LR < cm.base_learning_rate(lora)
    real = full.model_copy(update={"base_model": "acme/llama"})
    assert cm.base_learning_rate(real) == 2e-5
