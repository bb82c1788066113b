"""The ``sample`` method: K answers per prompt for a feedback session, no training.

The base model is loaded as for training (the tiny model built locally, or a local folder);
an ``ft:`` model's adapter (``init_adapter_key``) goes on top through peft. Prompts are encoded
as the rlhf policy sees them (a chat prompt through the chat template with the generation
prompt, a plain prompt as text), and each prompt's K answers come from one ``generate`` call
with ``do_sample``, seeded with ``seed + prompt index``: a retried attempt writes the same
answers. ``top_k`` is off, so ``top_p`` alone truncates the distribution.

Output: ``samples.jsonl`` (one ``SampleRecord`` per prompt), then ``manifest.json`` with its
checksum, under ``spec.samples_prefix``; samples without a manifest do not exist. Progress
goes out as metrics events (``prompts_generated`` of ``prompts_total``), at most every
``PROGRESS_EVERY_S`` seconds and once at the end.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tuneforge.storage import MANIFEST, Storage
from tuneforge.types import SampleRecord
from tuneforge_trainer.config_mapping import compute_dtype
from tuneforge_trainer.errors import ConfigError
from tuneforge_trainer.publish import manifest_header, sha256_file
from tuneforge_trainer.rlhf.prompts import PromptData
from tuneforge_trainer.training import RunContext

SAMPLES_FILE = "samples.jsonl"
PROGRESS_EVERY_S = 2.0


def load_generator(ctx: RunContext, *, chat: bool) -> tuple[Any, Any]:
    """``(model, tokenizer)`` ready to generate: the base, with the ft: model's adapter if any."""
    import torch
    from transformers import AutoModelForCausalLM

    from tuneforge_trainer.modeling import load_tokenizer

    tokenizer = load_tokenizer(ctx.spec, ctx.base_model_dir, chat=chat)
    model = AutoModelForCausalLM.from_pretrained(
        ctx.base_model_dir, dtype=getattr(torch, compute_dtype(ctx.spec))
    )
    if ctx.init_adapter_dir is not None:
        from peft import PeftModel

        config = json.loads((ctx.init_adapter_dir / "adapter_config.json").read_text())
        if config.get("task_type") != "CAUSAL_LM":
            raise ConfigError(
                "invalid_model", "the model's adapter is not a language model's (a reward model?)", "model"
            )
        model = PeftModel.from_pretrained(model, ctx.init_adapter_dir)
    if ctx.spec.resources.gpus > 0 and torch.cuda.is_available():
        model = model.to("cuda")
    model.eval()
    return model, tokenizer


def generate_answers(
    model: Any, tokenizer: Any, prompt: Any, *, k: int, seed: int, sampling: Any
) -> tuple[list[str], int]:
    """K sampled answers to one prompt, and the number of tokens generated."""
    import torch
    from transformers import set_seed

    from tuneforge_trainer.rlhf.ppo import encode_prompts
    from tuneforge_trainer.rlhf.ppo_math import truncate_after_eos

    set_seed(seed)
    query, query_mask = encode_prompts(tokenizer, [prompt])
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(
            input_ids=query.to(device),
            attention_mask=query_mask.to(device),
            do_sample=True,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=0,
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=k,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    responses = out[:, query.shape[1] :].cpu()
    mask, _ = truncate_after_eos(responses, tokenizer.eos_token_id)
    answers = [
        tokenizer.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(responses, mask, strict=True)
    ]
    return answers, int(mask.sum())


def generate_and_publish(ctx: RunContext, prompts: PromptData, storage: Storage) -> dict[str, Any]:
    """Generate every prompt's answers, then publish them; returns the run's metrics."""
    spec = ctx.spec
    sampling = spec.method.sample
    if sampling is None or spec.samples_prefix is None:
        raise ConfigError("invalid_method", "a sample job needs method.sample and samples_prefix", "method")
    started = time.monotonic()
    model, tokenizer = load_generator(ctx, chat=prompts.conversational)
    out_path = ctx.work_dir / SAMPLES_FILE
    total = len(prompts)
    generated_tokens, last_report = 0, 0.0
    with open(out_path, "w", encoding="utf-8") as fh:
        for index, record in enumerate(prompts.records):
            answers, n_tokens = generate_answers(
                model, tokenizer, record["prompt"], k=sampling.k, seed=spec.seed + index, sampling=sampling
            )
            generated_tokens += n_tokens
            fh.write(
                SampleRecord(index=index, prompt=record["prompt"], answers=answers).model_dump_json() + "\n"
            )
            done = index + 1
            if ctx.reporter is not None and (
                done == total or time.monotonic() - last_report >= PROGRESS_EVERY_S
            ):
                last_report = time.monotonic()
                ctx.reporter.metrics(
                    f"generated answers for {done}/{total} prompts",
                    {"prompts_generated": done, "prompts_total": total},
                )
    metrics = {
        "steps": total,  # one step per prompt, for the trainer's closing message
        "final_loss": None,
        "trained_tokens": 0,
        "prompts": total,
        "answers": total * sampling.k,
        "generated_tokens": generated_tokens,
        "seconds": round(time.monotonic() - started, 3),
    }
    publish_samples(storage, ctx, out_path, metrics)
    return metrics


def publish_samples(
    storage: Storage, ctx: RunContext, samples: Path, metrics: dict[str, Any]
) -> dict[str, Any]:
    """Upload ``samples.jsonl``, then the manifest that makes it exist (after clearing what an
    earlier attempt may have left)."""
    spec = ctx.spec
    prefix = spec.samples_prefix or ""
    manifest = {
        **manifest_header(spec),
        "k": spec.method.sample.k if spec.method.sample else None,
        "files": {SAMPLES_FILE: sha256_file(samples)},
        "metrics": metrics,
    }
    storage.delete_prefix(prefix)
    storage.put_file(prefix + SAMPLES_FILE, samples)
    storage.put_bytes(prefix + MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8"))
    return manifest
