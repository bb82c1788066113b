"""Token statistics of a stored file for one model, for the dry run, without a full re-read:

- no tokenizer for the model (or no ``tokenizers`` library): the stored sizes at bytes/4;
- a file of at most ``token_sample_bytes``: read again and tokenized whole, so exact;
- a larger one: the first ``token_sample_bytes`` are tokenized, and the tokens-per-size ratio
  they give scales the stored per-example sizes (so the p95 and the count over the model's
  max_seq_length come from the whole file, the ratio from its head).
"""

from __future__ import annotations

import io
from typing import Any

from tuneforge.storage import file_key
from tuneforge_api.db.tables import FileRow
from tuneforge_api.services import Services
from tuneforge_api.validation.report import DEFAULT_RATIO, SizeProfile
from tuneforge_api.validation.scan import validate_jsonl
from tuneforge_api.validation.service import ValidationSettings, token_sample
from tuneforge_api.validation.tokens import max_seq_length_for, token_stats


def model_stats(services: Services, settings: ValidationSettings, row: FileRow, model: str) -> dict[str, Any]:
    """Blocking (storage reads, tokenizing): run it in a thread."""
    key = file_key(row.project_id, row.id)
    profile = SizeProfile.from_json(row.size_profile) if row.size_profile else None
    small = row.bytes <= settings.token_sample_bytes
    sample = token_sample(services, settings, row.bytes if small else 0, model)
    if sample is None or profile is None:
        limit = max_seq_length_for(services.base_models().get(model))
        return token_stats(profile or SizeProfile(), None, limit)
    with services.storage.open_read(key) as fh:
        head = fh.read() if small else fh.read(settings.token_sample_bytes)
    if not small:
        head = head[: head.rfind(b"\n") + 1]
    report = validate_jsonl(io.BytesIO(head), sample=sample, limits=settings.limits())
    if small:
        return report.stats
    ratio = sample.tokens.total / sample.sizes if sample.sizes else DEFAULT_RATIO
    stats = profile.token_stats(ratio, sample.ref.max_seq_length)
    return {
        **stats,
        "tokenizer": sample.ref.model,
        "estimated": True,
        "method": "calibrated",
        "sampled_examples": sample.tokens.n,
    }
