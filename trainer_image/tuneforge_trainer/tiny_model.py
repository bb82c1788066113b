"""The built-in base model ``tuneforge/tiny-llama``: built locally, never downloaded.

A random two-layer Llama (~100k parameters) with a byte-level BPE tokenizer trained on a
bundled corpus. Tests and the demo train it on a CPU in seconds. The build is deterministic
(same bytes every time on one machine) and atomic: it happens in a temp folder next to the
target under a file lock and is renamed into place, so a reader never sees half a model.

Heavy imports (torch, transformers, tokenizers) happen inside the build, so importing this
module stays cheap.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from tuneforge.types import TINY_MODEL_ID
from tuneforge_trainer.errors import ConfigError

if TYPE_CHECKING:
    from tuneforge.types import JobSpec

__all__ = ["TINY_MODEL_ID", "ensure_tiny_model", "resolve_base_model"]

# Bump when build_tiny_model changes in a way the fingerprint below cannot see.
BUILD_VERSION = 1
VOCAB_SIZE = 1024
SEED = 0
PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|end|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]
SPECIAL_TOKENS = [PAD, BOS, EOS, *ROLE_TOKENS]

# Every turn is "<|role|>\n{content}<|end|>\n". The assistant's content and its <|end|> sit
# inside {% generation %} so the assistant mask (and so the loss) covers exactly what the
# model must learn to produce, including when to stop.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|assistant|>\n' }}"
    "{%- generation -%}{{ message['content'] + eos_token }}{%- endgeneration -%}"
    "{{ '\n' }}"
    "{%- else -%}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)

REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def _corpus() -> str:
    return resources.files("tuneforge_trainer").joinpath("assets/tiny_corpus.txt").read_text("utf-8")


def _fingerprint() -> str:
    """Names the cache folder after the recipe, so a changed recipe never reuses an old build."""
    recipe = f"{BUILD_VERSION}|{VOCAB_SIZE}|{SEED}|{CHAT_TEMPLATE}|{_corpus()}"
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


TINY_MODEL_DIRNAME = f"tuneforge--tiny-llama-{_fingerprint()}"


def default_models_cache() -> Path:
    """TUNEFORGE_MODELS_CACHE, else $TUNEFORGE_HOME/cache/models, else ~/.tuneforge/cache/models."""
    if explicit := os.environ.get("TUNEFORGE_MODELS_CACHE"):
        return Path(explicit)
    home = os.environ.get("TUNEFORGE_HOME")
    base = Path(home) if home else Path.home() / ".tuneforge"
    return base / "cache" / "models"


def ensure_tiny_model(cache_dir: Path | None = None) -> Path:
    """Return the tiny model's folder, building it first if needed (safe across processes)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_models_cache()
    target = cache_dir / TINY_MODEL_DIRNAME
    if _is_complete(target):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{TINY_MODEL_DIRNAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if we crash
        if _is_complete(target):  # another process built it while we waited
            return target
        if target.exists():  # not ours to trust: only a rename creates it, so this is debris
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_MODEL_DIRNAME}.tmp-", dir=cache_dir))
        try:
            build_tiny_model(tmp)
            _make_readable(tmp)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED_FILES)


def _make_readable(folder: Path) -> None:
    # mkdtemp and safetensors create owner-only files; the cache may be shared between users.
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def build_tiny_model(out_dir: Path) -> None:
    """Write tokenizer, config and random weights into ``out_dir`` (deterministic)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=512,
        # The default 0.02 leaves the tied output embedding so small that logits stay near
        # uniform whatever LoRA does (loss floor ~5.2); 0.2 lets an adapter visibly learn.
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def build_tokenizer():  # -> PreTrainedTokenizerFast (kept lazy)
    """Byte-level BPE trained in-process on the bundled corpus; any text encodes, nothing is unknown."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = _corpus()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(corpus.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
        padding_side="right",
    )


def resolve_base_model(spec: JobSpec) -> Path:
    """The local folder of the spec's base model; never a hub download."""
    if spec.base_model == TINY_MODEL_ID:
        return ensure_tiny_model()
    if not spec.base_model_path:
        raise ConfigError(
            "model_not_available",
            f"base model {spec.base_model!r} has no local path on this trainer",
            "model",
        )
    path = Path(spec.base_model_path)
    if not (path / "config.json").is_file():
        raise ConfigError(
            "model_not_available",
            f"base model {spec.base_model!r} is not a model folder on this trainer",
            "model",
        )
    return path
