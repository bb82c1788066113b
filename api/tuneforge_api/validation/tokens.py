"""Token counts with a model's own ``tokenizer.json``, through the ``tokenizers`` library (a Rust
wheel; no torch, no transformers), or a documented estimate when none is available.

Where the tokenizers come from:

- a local base model: ``TUNEFORGE_MODELS_DIR/<org--name>/tokenizer.json``;
- the built-in tiny model, once the trainer has built it: ``<models cache>/tuneforge--tiny-llama-*/``,
  where the models cache is ``TUNEFORGE_MODELS_CACHE`` or ``$TUNEFORGE_HOME/cache/models`` (the
  trainer's own rule).

The chat template is not rendered (that needs transformers and jinja); each message is counted
as its text plus a fixed allowance (see ``rules.MESSAGE_OVERHEAD``). Tokenizing is slow next to
validation (the tiny model's tokenizer manages ~1 MB/s here), so only a sample of examples is
tokenized, and the ratio of tokens to size it gives is applied to every example. A file whose
every example fits in the sample gets exact counts.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.types import TINY_MODEL_ID
from tuneforge_api.validation.report import DEFAULT_RATIO, SizeProfile

# The trainer's own cap on sequence length (tuneforge_trainer.config_mapping.DEFAULT_MAX_LENGTH),
# lowered to a model's max_position_embeddings where that is smaller.
DEFAULT_MAX_SEQ_LENGTH = 1024
TINY_DIR_GLOB = "tuneforge--tiny-llama-*"
BATCH = 256  # examples per encode_batch call

_loaded: dict[tuple[str, float], Any] = {}
_lock = threading.Lock()


@dataclass(frozen=True)
class TokenizerRef:
    model: str
    path: Path  # tokenizer.json
    max_seq_length: int


def models_cache(home: Path) -> Path:
    explicit = os.environ.get("TUNEFORGE_MODELS_CACHE")
    return Path(explicit) if explicit else home / "cache" / "models"


def max_seq_length_for(folder: Path | None) -> int:
    try:
        config = json.loads((folder / "config.json").read_text()) if folder else {}
    except (OSError, ValueError):
        config = {}
    positions = config.get("max_position_embeddings")
    return min(DEFAULT_MAX_SEQ_LENGTH, positions) if isinstance(positions, int) else DEFAULT_MAX_SEQ_LENGTH


def find_tokenizer(model: str, folder: Path | None, cache: Path) -> TokenizerRef | None:
    """The tokenizer of ``model`` (its local folder, or the tiny model's build), if there is one."""
    if folder is None and model == TINY_MODEL_ID:
        builds = sorted(cache.glob(TINY_DIR_GLOB), key=lambda p: p.stat().st_mtime, reverse=True)
        folder = next((b for b in builds if (b / "tokenizer.json").is_file()), None)
    if folder is None or not (folder / "tokenizer.json").is_file():
        return None
    return TokenizerRef(model, folder / "tokenizer.json", max_seq_length_for(folder))


def load(ref: TokenizerRef) -> Any | None:
    """The ``tokenizers.Tokenizer`` (cached per file version), or None without the library."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    key = (str(ref.path), ref.path.stat().st_mtime)
    with _lock:
        if key not in _loaded:
            _loaded[key] = Tokenizer.from_file(str(ref.path))
        return _loaded[key]


@dataclass
class TokenSample:
    """Tokenizes about one example in ``stride``, in batches; sizes and tokens side by side.

    Lines are chosen by their key (``fast.line_key``), not their number: a worker process that
    classifies a block knows its lines' keys but not their numbers.
    """

    tokenizer: Any
    ref: TokenizerRef
    stride: int
    sizes: int = 0
    tokens: SizeProfile = field(default_factory=SizeProfile)
    n_over: int = 0
    _pending: list[tuple[list[tuple[str, bool]], int, int, int]] = field(default_factory=list)

    def wants(self, key: int) -> bool:
        return key % self.stride == 0

    def add(self, texts: list[tuple[str, bool]], overhead: int, trained_overhead: int, size: int) -> None:
        self._pending.append((texts, overhead, trained_overhead, size))
        if len(self._pending) >= BATCH:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        flat = [text for texts, *_ in self._pending for text, _ in texts]
        lengths = iter(map(len, self.tokenizer.encode_batch_fast(flat, add_special_tokens=False)))
        limit = self.ref.max_seq_length
        for texts, overhead, trained_overhead, size in self._pending:
            total, trained = overhead // 4, trained_overhead // 4
            for _, is_trained in texts:
                n = next(lengths)
                total += n
                trained += n if is_trained else 0
            self.tokens.add(total, trained, total)
            self.sizes += size
            self.n_over += total > limit
        self._pending.clear()


def token_stats(profile: SizeProfile, sample: TokenSample | None, max_seq_length: int) -> dict[str, Any]:
    """Token statistics of a file: exact when every example was tokenized, else estimated."""
    if sample is not None:
        sample.flush()
    if sample is None or not sample.tokens.n:
        stats = profile.token_stats(DEFAULT_RATIO, max_seq_length)
        return {**stats, "tokenizer": None, "estimated": True, "method": "bytes/4", "sampled_examples": 0}
    if sample.tokens.n == profile.n:
        stats = sample.tokens.token_stats(1.0, sample.ref.max_seq_length)
        stats["n_over_max_seq_length"] = sample.n_over
        method, estimated = "exact", False
    else:
        ratio = sample.tokens.total / sample.sizes if sample.sizes else DEFAULT_RATIO
        stats = profile.token_stats(ratio, sample.ref.max_seq_length)
        method, estimated = "calibrated", True
    return {
        **stats,
        "tokenizer": sample.ref.model,
        "estimated": estimated,
        "method": method,
        "sampled_examples": sample.tokens.n,
    }
