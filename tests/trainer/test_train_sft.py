"""End to end: ``python -m tuneforge_trainer`` trains the tiny model for real and publishes the adapter.

The trainer runs as a subprocess, as an executor would run it, against a file:// storage and a
loopback HTTP server standing in for the API's events route.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tuneforge.storage import FileStorage, adapter_prefix, get_dir, job_prefix
from tuneforge_trainer.publish import sha256_file, tokenizer_sha256

if TYPE_CHECKING:
    from tests.trainer.conftest import EventSink, TrainerJob

REPO = Path(__file__).resolve().parents[2]
DEMO_DATA = (REPO / "examples" / "demo_chat.jsonl").read_bytes()
JOB_TOKEN = "tf-job-secret-token-for-tests"  # the value conftest puts in the trainer's environment
METRIC_KEYS = {
    "step",
    "total_steps",
    "train_loss",
    "learning_rate",
    "tokens_per_second",
    "eta_seconds",
    "trained_tokens",
    "epoch",
}
# TRL 1.16 calls a method transformers 5 renamed; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
RunTrainer = Callable[["TrainerJob"], subprocess.CompletedProcess[str]]


@dataclass
class Run:
    job: TrainerJob
    result: subprocess.CompletedProcess[str]
    requests: list[dict[str, Any]]

    @property
    def events(self) -> list[dict[str, Any]]:
        return [r["body"] for r in self.requests]

    @property
    def metrics(self) -> list[dict[str, Any]]:
        return [e["data"] for e in self.events if e["type"] == "metrics"]

    def key(self, suffix: str = "") -> str:
        return job_prefix(self.job.spec["project_id"], self.job.job_id) + suffix


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_dir: Path,
    module_event_sink: EventSink,
    make_job: Callable[..., TrainerJob],
    run_trainer: RunTrainer,
) -> Run:
    """One real training run on the 64 demo examples (8 epochs, 64 steps), shared by the tests below."""
    job = make_job(tmp_path_factory.mktemp("sft"), DEMO_DATA, module_event_sink.url)
    result = run_trainer(job)
    return Run(job, result, list(module_event_sink.requests))


def test_run_succeeds(trained: Run) -> None:
    assert trained.result.returncode == 0, trained.result.stderr[-3000:]
    assert "adapter published" in trained.result.stdout
    assert "step 64/64" in trained.result.stdout  # progress lines go to the run's log
    assert JOB_TOKEN not in trained.result.stdout + trained.result.stderr


def test_manifest_is_complete_and_matches_the_files(trained: Run, tiny_model_dir: Path) -> None:
    storage = FileStorage(trained.job.root)
    prefix = adapter_prefix(trained.job.spec["project_id"], trained.job.job_id)
    manifest = json.loads(storage.get_bytes(prefix + "manifest.json"))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(manifest["files"])
    assert sorted(manifest["files"]) == sorted(
        k[len(prefix) :] for k in storage.list(prefix) if k != prefix + "manifest.json"
    )
    for name, digest in manifest["files"].items():
        assert sha256_file(trained.job.root / prefix / name) == digest, name
    assert manifest["job_id"] == trained.job.job_id
    assert manifest["attempt"] == 1
    assert manifest["base_model"] == "tuneforge/tiny-llama"
    assert manifest["lora"]["r"] == 16
    assert manifest["tokenizer_sha256"] == tokenizer_sha256(tiny_model_dir)  # the base's tokenizer, unchanged
    metrics = manifest["metrics"]
    assert metrics["steps"] == 64
    assert metrics["trained_tokens"] > 0
    assert metrics["final_loss"] < metrics["first_loss"]
    adapter_config = json.loads(storage.get_bytes(prefix + "adapter_config.json"))
    assert adapter_config["base_model_name_or_path"] == "tuneforge/tiny-llama"  # not a local path


def test_events_report_progress(trained: Run) -> None:
    assert all(r["headers"]["Authorization"] == f"Bearer {JOB_TOKEN}" for r in trained.requests)
    assert trained.events[0]["message"].startswith("Training file checked: ")
    assert trained.events[-1]["message"].startswith("attempt 1 succeeded")
    metrics = trained.metrics
    assert [m["step"] for m in metrics] == list(range(1, 65))
    assert all(set(m) == METRIC_KEYS and m["total_steps"] == 64 for m in metrics)
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert metrics[-1]["eta_seconds"] == 0
    tokens = [m["trained_tokens"] for m in metrics]
    assert tokens == sorted(tokens) and tokens[0] > 0


def test_adapter_loads_and_changes_the_model(trained: Run, tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir = tmp_path / "adapter"
    get_dir(FileStorage(trained.job.root), trained.key("adapter/"), adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tuned = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir
    ).eval()

    lora_b = [p for name, p in tuned.named_parameters() if "lora_B" in name]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # lora_B starts at zero

    def answer(model: Any, question: str) -> str:
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}],
            add_generation_prompt=True,
            return_dict=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    question = "What is the capital of Tuneland?"
    assert answer(tuned, question) != answer(base, question)
    assert "Forgeville" in answer(tuned, question)


def test_bad_data_fails_with_exit_42_and_line_numbers(
    tmp_path: Path, event_sink: EventSink, make_job: Callable[..., TrainerJob], run_trainer: RunTrainer
) -> None:
    good = DEMO_DATA.splitlines()[0]
    bad = b"\n".join([good, b"{not json", good, b'{"messages": [{"role": "user", "content": "hi"}]}'])
    job = make_job(tmp_path, bad, event_sink.url)
    result = run_trainer(job)

    assert result.returncode == 42, result.stderr[-3000:]
    error = json.loads(FileStorage(job.root).get_bytes(job_prefix("proj-test", job.job_id) + "error.json"))
    assert error["code"] == "invalid_training_file"
    assert error["param"] == "training_file"
    assert "line 2: not valid JSON (not_json)" in error["message"]
    assert "line 4:" in error["message"] and "missing_assistant_message" in error["message"]
    last = event_sink.events()[-1]
    assert last["level"] == "error"
    assert last["message"] == error["message"]
    assert "Traceback" not in last["message"] and "Traceback" not in result.stderr
    assert not FileStorage(job.root).list(job_prefix("proj-test", job.job_id) + "adapter/")


def test_unsupported_method_is_non_retriable(
    tmp_path: Path, event_sink: EventSink, make_job: Callable[..., TrainerJob], run_trainer: RunTrainer
) -> None:
    job = make_job(tmp_path, DEMO_DATA, event_sink.url, method={"type": "dpo"})
    result = run_trainer(job)
    assert result.returncode == 42
    error = json.loads(FileStorage(job.root).get_bytes(job_prefix("proj-test", job.job_id) + "error.json"))
    assert error == {
        "code": "unsupported_method",
        "message": "method 'dpo' is not supported yet",
        "param": "method.type",
    }


def test_unexpected_failure_is_retriable(
    tmp_path: Path, event_sink: EventSink, make_job: Callable[..., TrainerJob], run_trainer: RunTrainer
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the storage root should be")
    job = make_job(tmp_path, DEMO_DATA, event_sink.url, storage_uri=blocker.as_uri())
    result = run_trainer(job)
    assert result.returncode == 1
    assert "Traceback" in result.stderr  # the details go to the log ...
    last = event_sink.events()[-1]
    assert last["level"] == "warn"
    assert "Traceback" not in last["message"]  # ... not to the user
    assert "will be retried" in last["message"]


def test_sigterm_stops_the_run_promptly(
    tmp_path: Path,
    tiny_model_dir: Path,
    event_sink: EventSink,
    make_job: Callable[..., TrainerJob],
    trainer_env: dict[str, str],
) -> None:
    long_run = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50, "batch_size": 1}}}
    job = make_job(tmp_path, DEMO_DATA, event_sink.url, method=long_run)
    log = tmp_path / "run.log"
    with open(log, "w") as out:  # a file, not a pipe: an undrained pipe could block the trainer
        proc = subprocess.Popen(job.command, env=trainer_env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while "step 1/" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert proc.poll() is None, log.read_text()[-3000:]
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=15)
            assert time.monotonic() - sent < 5
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM  # retriable
    assert "received SIGTERM" in log.read_text()
    assert not FileStorage(job.root).list(job_prefix("proj-test", job.job_id) + "adapter/")


def in_process_spec(tmp_path: Path, **overrides: Any) -> Any:
    from tuneforge.types import JobSpec

    fields = {
        "job_id": "ftjob-inproc",
        "project_id": "p",
        "attempt": 1,
        "base_model": "tuneforge/tiny-llama",
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}}},
        "lora": {"r": 4, "alpha": 8},
        "training_file_key": "k",
        "storage_uri": tmp_path.as_uri(),
        "api_base_url": "http://127.0.0.1:9",
    }
    return JobSpec.model_validate({**fields, **overrides})


def test_prompt_completion_data_trains_in_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    from tuneforge_trainer.data import parse_sft_lines
    from tuneforge_trainer.sft import train_sft

    rows = [{"prompt": f"Q{i}: capital of Tuneland?", "completion": " Forgeville."} for i in range(16)]
    data = parse_sft_lines([json.dumps(r).encode() for r in rows])
    assert data.format == "prompt_completion"
    metrics = train_sft(
        in_process_spec(tmp_path), tiny_model_dir, data, work_dir=tmp_path / "w", adapter_dir=tmp_path / "a"
    )
    assert metrics["steps"] == 8
    assert metrics["final_loss"] < metrics["first_loss"]
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()


def test_qlora_nf4_trains_on_cpu(tiny_model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from tuneforge_trainer.data import parse_sft_lines
    from tuneforge_trainer.sft import train_sft

    data = parse_sft_lines(DEMO_DATA.splitlines()[:16])
    spec = in_process_spec(tmp_path, quantization="nf4")
    metrics = train_sft(spec, tiny_model_dir, data, work_dir=tmp_path / "w", adapter_dir=tmp_path / "a")
    assert metrics["steps"] == 8
    assert metrics["final_loss"] < metrics["first_loss"]
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()


def test_mapped_kwargs_build_the_library_configs(tmp_path: Path) -> None:
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig
    from trl import SFTConfig

    from tuneforge.types import JobSpec
    from tuneforge_trainer import config_mapping as cm
    from tuneforge_trainer.sft import _current_names

    spec = JobSpec.model_validate(
        {
            "job_id": "j",
            "project_id": "p",
            "attempt": 1,
            "base_model": "tuneforge/tiny-llama",
            "method": {"type": "supervised"},
            "lora": {},
            "quantization": "nf4",
            "training_file_key": "k",
            "storage_uri": tmp_path.as_uri(),
            "api_base_url": "http://127.0.0.1:9",
        }
    )
    hp = cm.resolve_hyperparameters(spec.method.params.hyperparameters, 64)
    kwargs = cm.sft_config_kwargs(spec, hp, output_dir=str(tmp_path), data_format="messages")
    args = SFTConfig(**_current_names(kwargs, SFTConfig))
    assert (args.use_cpu, args.bf16, args.fp16, args.gradient_checkpointing) == (True, False, False, False)
    assert args.assistant_only_loss is True
    assert LoraConfig(**cm.lora_config_kwargs(spec)).r == 16
    bnb = BitsAndBytesConfig(**cm.quantization_config_kwargs(spec))
    assert bnb.load_in_4bit and bnb.bnb_4bit_use_double_quant and bnb.bnb_4bit_quant_type == "nf4"
