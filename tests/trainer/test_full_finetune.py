"""Full fine-tuning (``method.supervised.adapter: "full"``): every weight trains, and the job
publishes a whole model folder that loads with ``from_pretrained`` alone."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tuneforge.storage import FileStorage, adapter_prefix, get_dir, job_prefix

if TYPE_CHECKING:
    from tests.trainer.conftest import EventSink, TrainerJob

REPO = Path(__file__).resolve().parents[2]
DEMO = (REPO / "examples" / "demo_chat.jsonl").read_bytes()
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def full_method(**hyperparameters: Any) -> dict[str, Any]:
    hp = {"n_epochs": 4, "batch_size": 4, **hyperparameters}
    return {"type": "supervised", "supervised": {"hyperparameters": hp, "adapter": "full"}}


def test_full_fine_tuning_publishes_a_model_folder(
    tmp_path: Path,
    tiny_model_dir: Path,
    event_sink: EventSink,
    make_job: Callable[..., TrainerJob],
    run_trainer: Callable[[TrainerJob], Any],
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = b"\n".join(DEMO.splitlines()[:16])
    job = make_job(tmp_path, data, event_sink.url, method=full_method())
    result = run_trainer(job)
    assert result.returncode == 0, result.stderr[-3000:]

    storage = FileStorage(job.root)
    prefix = adapter_prefix("proj-test", job.job_id)
    manifest = json.loads(storage.get_bytes(prefix + "manifest.json"))
    assert manifest["adapter"] == "full" and manifest["lora"] is None
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["files"])
    assert not any(name.startswith("adapter_") for name in manifest["files"])
    assert manifest["metrics"]["steps"] == 16
    assert manifest["metrics"]["final_loss"] < manifest["metrics"]["first_loss"]

    folder = tmp_path / "model"
    get_dir(storage, prefix, folder)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = AutoModelForCausalLM.from_pretrained(folder)  # no peft: a plain model folder
    assert (
        AutoTokenizer.from_pretrained(folder).get_vocab()
        == AutoTokenizer.from_pretrained(tiny_model_dir).get_vocab()
    )
    before, after = dict(base.named_parameters()), dict(tuned.named_parameters())
    assert before.keys() == after.keys()
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert unchanged == []  # every weight trained: embeddings, attention, MLP, norms


def test_full_fine_tuning_of_a_quantized_base_fails_for_good(
    tmp_path: Path,
    event_sink: EventSink,
    make_job: Callable[..., TrainerJob],
    run_trainer: Callable[[TrainerJob], Any],
) -> None:
    """The API refuses this at create time; a hand-made spec still gets a clear, non-retriable error."""
    pytest.importorskip("bitsandbytes")
    job = make_job(tmp_path, DEMO, event_sink.url, method=full_method(), quantization="nf4")
    result = run_trainer(job)
    assert result.returncode == 42, result.stderr[-3000:]
    error = json.loads(FileStorage(job.root).get_bytes(job_prefix("proj-test", job.job_id) + "error.json"))
    assert error == {
        "code": "invalid_adapter",
        "message": "full fine-tuning needs an unquantized base",
        "param": "quantization",
    }
