"""The built-in tiny model: deterministic, atomic, and its chat template masks assistant tokens."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tuneforge_trainer import tiny_model
from tuneforge_trainer.errors import ConfigError
from tuneforge_trainer.tiny_model import TINY_MODEL_DIRNAME, ensure_tiny_model, resolve_base_model

CHAT = [
    {"role": "system", "content": "You are a helpful guide to Tuneland."},
    {"role": "user", "content": "What is the capital of Tuneland?"},
    {"role": "assistant", "content": "The capital of Tuneland is Forgeville."},
]


def test_build_is_deterministic(tiny_model_dir: Path, tmp_path: Path) -> None:
    again = ensure_tiny_model(tmp_path)
    names = sorted(p.name for p in tiny_model_dir.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= set(names)
    for name in names:
        assert (tiny_model_dir / name).read_bytes() == (again / name).read_bytes(), name


def test_loads_offline_with_the_expected_shape(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)
    config = model.config
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (64, 128, 2)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.tie_word_embeddings is True
    assert config.max_position_embeddings == 512
    assert 512 <= len(tokenizer) <= 1024 == tiny_model.VOCAB_SIZE
    assert config.vocab_size == len(tokenizer)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    # The corpus covers the demo's words, so they are single tokens, not byte soup.
    assert tokenizer.tokenize(" Tuneland") == ["ĠTuneland"]
    assert tokenizer.tokenize(" Forgeville") == ["ĠForgeville"]


def test_chat_template_masks_exactly_the_assistant_answer(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    out = tokenizer.apply_chat_template(CHAT, return_assistant_tokens_mask=True, return_dict=True)
    answer = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    # The end-of-turn token is inside the mask: the model learns when to stop.
    assert tokenizer.decode(answer) == "The capital of Tuneland is Forgeville.<|end|>"


def test_generation_prompt_is_a_prefix_of_the_full_conversation(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = tokenizer.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert prompt.endswith("<|assistant|>\n")
    assert full.startswith(prompt)
    without = tokenizer.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=False)
    assert not without.endswith("<|assistant|>\n")


def test_concurrent_callers_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    builds: list[Path] = []
    real_build = tiny_model.build_tiny_model

    def counting_build(out_dir: Path) -> None:
        builds.append(out_dir)
        real_build(out_dir)

    monkeypatch.setattr(tiny_model, "build_tiny_model", counting_build)
    results: list[Path] = []
    # flock locks belong to open file descriptions, so threads contend like processes do.
    threads = [threading.Thread(target=lambda: results.append(ensure_tiny_model(tmp_path))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1
    assert results == [tmp_path / TINY_MODEL_DIRNAME] * 3
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [TINY_MODEL_DIRNAME]  # no temp dirs left


def test_half_built_folder_is_rebuilt(tmp_path: Path, tiny_model_dir: Path) -> None:
    debris = tmp_path / TINY_MODEL_DIRNAME
    debris.mkdir()
    (debris / "config.json").write_text("{}")  # no weights: never usable
    built = ensure_tiny_model(tmp_path)
    assert (built / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()


def test_failed_build_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_build(out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny_model, "build_tiny_model", broken_build)
    with pytest.raises(RuntimeError):
        ensure_tiny_model(tmp_path)
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []


def test_cache_dir_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TUNEFORGE_MODELS_CACHE", raising=False)
    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "home"))
    assert tiny_model.default_models_cache() == tmp_path / "home" / "cache" / "models"
    monkeypatch.setenv("TUNEFORGE_MODELS_CACHE", str(tmp_path / "explicit"))
    assert tiny_model.default_models_cache() == tmp_path / "explicit"
    monkeypatch.delenv("TUNEFORGE_MODELS_CACHE")
    monkeypatch.delenv("TUNEFORGE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert tiny_model.default_models_cache() == tmp_path / "user" / ".tuneforge" / "cache" / "models"


def test_resolve_base_model_never_downloads(tmp_path: Path) -> None:
    from tuneforge.types import JobSpec

    def spec(**kw: object) -> JobSpec:
        base = {
            "job_id": "j",
            "project_id": "p",
            "attempt": 1,
            "method": {"type": "supervised"},
            "lora": {},
            "training_file_key": "k",
            "storage_uri": "file:///x",
            "api_base_url": "http://x",
        }
        return JobSpec.model_validate({**base, **kw})

    with pytest.raises(ConfigError) as info:
        resolve_base_model(spec(base_model="meta-llama/Llama-3-8B"))
    assert info.value.code == "model_not_available"
    with pytest.raises(ConfigError):
        resolve_base_model(spec(base_model="local", base_model_path=str(tmp_path)))  # no config.json
    (tmp_path / "config.json").write_text("{}")
    assert resolve_base_model(spec(base_model="local", base_model_path=str(tmp_path))) == tmp_path
