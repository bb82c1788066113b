"""Trainer throughput on one GPU (not a test): plain TRL vs Unsloth vs Tuneforge, QLoRA by default.

Usage: python bench/train_throughput.py [--model 1b|8b] [--steps 30] [--warmup 5] [--precision nf4|bf16]
       [--runners trl,unsloth,tuneforge] [--write]

1. Builds a random-init model with Llama-3.2-1B (or Llama-3-8B) dimensions, saved once, so
   every runner loads the same weights; LoRA B starts at zero, so step-0 losses must match.
2. Makes a synthetic token dataset, lengths uniform in 128..2048 (seeded).
3. Runs each runner in its own process: same LoRA (r=16, all linear layers), AdamW, LR,
   max length and examples (so real tokens) per step. trl and unsloth checkpoint activations;
   tuneforge uses the trainer's own acceleration plan (tuneforge_trainer.acceleration: attention
   kernel, Liger, checkpointing only when its memory estimate says it must, compile on opt-in),
   exactly as a job on this card would.
4. Reports steady-state real tokens/s, time to first step, peak GPU memory, MFU and the
   step-0 loss (tuneforge's row also carries its plan and memory estimate in the JSON line);
   with --write, appends the table to bench/RESULTS.md with the card and the date.

Without a GPU it says so and exits 0. The pure parts (FLOP formula, MFU, data generator) sit at
the top of this file without heavy imports; tests/bench/test_train_throughput_pure.py tests them.

FLOP formula (model FLOPs, not hardware FLOPs: recomputation under checkpointing is not counted):
  a matmul with a weight of n parameters costs 2n FLOPs per token forward; backward costs 2n
  for the activation gradient plus 2n for the weight gradient (Kaplan et al. 2020, sec. 2.1;
  PaLM, Chowdhery et al. 2022, app. B). Full fine-tuning: 6N per token. LoRA freezes the base,
  so its weight gradients are never computed: 4N per token (LoRA's own r-rank matmuls add
  ~6·r·(d_in+d_out) per adapted layer, under 1 % at r=16, and are left out). N counts every
  matmul weight, the LM head included, and not the embedding lookup. Attention (QK^T and AV)
  has no weights: 4·d·T FLOPs per token per layer forward, times 3 with backward, so 12·L·d·T
  per token for a sequence of T tokens (PaLM's 12·L·H·Q·T, H·Q = d; causal masking not halved).
  Per step: FLOPs = 4·N·Σ T_i + 12·L·d·Σ T_i²  (LoRA),  6·N·Σ T_i + 12·L·d·Σ T_i²  (full).
  MFU = FLOPs per second / the card's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tuneforge_trainer.acceleration import ModelShape

RESULTS = Path(__file__).with_name("RESULTS.md")
MIN_LEN, MAX_LEN = 128, 2048
LORA_R = 16
LEARNING_RATE = 2e-4
# Dense bf16 peaks (no sparsity), from the vendors' datasheets.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 SXM": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12}


@dataclass(frozen=True)
class ModelDims(ModelShape):
    """A benchmark model: the trainer's ``ModelShape`` (its parameter counts) with a name."""

    name: str = ""

    def llama_config_kwargs(self) -> dict[str, int | bool]:
        """These dimensions as ``transformers.LlamaConfig`` arguments."""
        return {
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "tie_word_embeddings": self.tied,
        }


MODELS = {
    "1b": ModelDims(2048, 8192, 16, 32, 8, 128256, tied=True, name="Llama-3.2-1B"),
    "8b": ModelDims(4096, 14336, 32, 32, 8, 128256, tied=False, name="Llama-3-8B"),
}


def matmul_params(m: ModelDims) -> int:
    """N: parameters that multiply activations (attention, MLP, LM head); not the embedding lookup."""
    return m.layer_linear_params + m.hidden * m.vocab  # a tied LM head still multiplies


def step_flops(m: ModelDims, lengths: list[int], *, lora: bool = True) -> float:
    """Model FLOPs of one forward+backward pass over sequences of these lengths (see the docstring)."""
    per_token = (4 if lora else 6) * matmul_params(m)
    attention = 12 * m.layers * m.hidden * sum(t * t for t in lengths)
    return float(per_token * sum(lengths) + attention)


def mfu(flops: float, seconds: float, peak_flops: float) -> float:
    return flops / seconds / peak_flops


def peak_flops_for(device_name: str) -> float | None:
    for key, value in PEAK_BF16_FLOPS.items():  # most specific names first
        if key in device_name:
            return value
    return None


def synthetic_lengths(n: int, seed: int = 0, lo: int = MIN_LEN, hi: int = MAX_LEN) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(lo, hi) for _ in range(n)]


def synthetic_dataset(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """``n`` sequences of random token ids, lengths uniform in 128..2048; same seed, same data."""
    rng = random.Random(seed + 1)
    return [[rng.randrange(vocab) for _ in range(t)] for t in synthetic_lengths(n, seed)]


def formula_text(m: ModelDims) -> str:
    n = matmul_params(m)
    return (
        f"FLOPs/step = 4·N·ΣT + 12·L·d·ΣT²  (LoRA; full fine-tuning 6·N)  with N={n / 1e9:.3f}B matmul "
        f"params, L={m.layers}, d={m.hidden}; MFU = FLOPs/s ÷ dense bf16 peak"
    )


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = "| runner | tokens/s | time to first step (s) | peak memory (GiB) | MFU | step-0 loss |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['runner']} | {r['error']} | | | | |")
            continue
        lines.append(
            f"| {r['runner']} | {r['tokens_per_second']:.0f} | {r['time_to_first_step']:.1f} | "
            f"{r['peak_memory_gib']:.1f} | {r['mfu']:.1%} | {r['step0_loss']:.4f} |"
        )
    return "\n".join(lines)


# ---- GPU parts: everything below imports torch inside functions -----------------------------


def gpu_name() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def build_model(m: ModelDims, out_dir: Path, seed: int = 0) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from tuneforge_trainer.tiny_model import build_tokenizer

    config = LlamaConfig(**m.llama_config_kwargs(), max_position_embeddings=MAX_LEN, pad_token_id=0)
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out_dir)
    # Only pad/eos ids matter: the data is already token ids.
    tokenizer: PreTrainedTokenizerFast = build_tokenizer()
    tokenizer.save_pretrained(out_dir)


@dataclass
class Options:
    runner: str
    model: str
    model_dir: str
    steps: int
    warmup: int
    examples_per_step: int
    precision: str
    launched_at: float = 0.0  # wall clock when the parent started this runner's process


def run_one(opts: Options) -> dict[str, Any]:
    """One runner, in this process: train ``opts.steps`` steps and measure."""
    if opts.runner == "unsloth":
        import unsloth  # noqa: F401 - Unsloth patches transformers and TRL, so it must come first
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    dims = MODELS[opts.model]
    started = opts.launched_at or time.time()  # time to first step includes imports and model loading
    n = opts.steps * opts.examples_per_step
    data = synthetic_dataset(n, dims.vocab)
    dataset = Dataset.from_list([{"input_ids": ids} for ids in data])
    step_ends: list[float] = []
    losses: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            torch.cuda.synchronize()
            step_ends.append(time.time())

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    trainer = _make_trainer(opts, dataset, Timer())
    plan = getattr(trainer, "tuneforge_plan", None)
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    # Sequential sampling (the data is random already): step k trains examples k*B..(k+1)*B-1 in
    # every runner. Steady state: the steps after warmup.
    per_step = [
        [len(ids) for ids in data[i : i + opts.examples_per_step]]
        for i in range(0, n, opts.examples_per_step)
    ]
    steady = range(opts.warmup, len(step_ends))
    seconds = step_ends[-1] - step_ends[opts.warmup - 1]
    flops = sum(step_flops(dims, per_step[i], lora=True) for i in steady)
    tokens = sum(sum(per_step[i]) for i in steady)
    peak = peak_flops_for(torch.cuda.get_device_name(0)) or float("nan")
    row = {
        "runner": opts.runner,
        "tokens_per_second": tokens / seconds,
        "time_to_first_step": step_ends[0] - started,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "mfu": mfu(flops, seconds, peak),
        "step0_loss": losses[0] if losses else float("nan"),
    }
    if plan is not None:  # so a GPU run can hold the memory estimate against the measured peak
        row.update(acceleration=plan.summary(), **plan.as_data())
    return row


def tuneforge_spec(precision: str) -> Any:
    """The JobSpec the tuneforge runner trains: the benchmark's LoRA on one GPU."""
    from tuneforge.types import JobSpec

    return JobSpec.model_validate(
        {
            "job_id": "bench",
            "project_id": "bench",
            "attempt": 1,
            "base_model": "bench",
            "method": {"type": "supervised"},
            "lora": {"r": LORA_R, "alpha": 2 * LORA_R, "dropout": 0.0},
            "quantization": "nf4" if precision == "nf4" else None,
            "resources": {"gpus": 1},
            "training_file_key": "k",
            "storage_uri": "file:///tmp",
            "api_base_url": "http://127.0.0.1:9",
        }
    )


def tuneforge_config(
    spec: Any, common: dict[str, Any], n_examples: int, environment: Any, shape: Any
) -> tuple[dict[str, Any], Any]:
    """``(SFTConfig kwargs, acceleration plan)``: Tuneforge's own mapping and plan for this machine,
    held to the benchmark's steps, batch, LR, seed, sampling and max length."""
    from tuneforge_trainer import acceleration as accel
    from tuneforge_trainer import config_mapping as cm

    hp = cm.resolve_hyperparameters(spec.method.params.hyperparameters, n_examples)
    batch = common["per_device_train_batch_size"]
    plan = accel.plan_acceleration(
        spec,
        environment,
        shape=shape,
        batch_tokens=accel.batch_tokens_for(spec, batch, common["max_length"]),
    )
    kwargs = cm.sft_config_kwargs(
        spec,
        hp,
        output_dir=common["output_dir"],
        data_format="prompt_completion",
        max_length=common["max_length"],
        acceleration=plan,
    )
    held = ("max_steps", "per_device_train_batch_size", "learning_rate", "seed", "train_sampling_strategy")
    kwargs.update({k: common[k] for k in held})
    kwargs.update(completion_only_loss=None, save_strategy="no", eval_strategy="no", logging_steps=1)
    return kwargs, plan


def _make_trainer(opts: Options, dataset: Any, timer: Any) -> Any:
    from peft import LoraConfig
    from transformers import AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(opts.model_dir)
    qlora = opts.precision == "nf4"
    common = {
        "output_dir": tempfile.mkdtemp(prefix="bench-"),
        "max_steps": opts.steps,
        "per_device_train_batch_size": opts.examples_per_step,
        "learning_rate": LEARNING_RATE,
        "optim": "adamw_torch",
        "bf16": True,
        "gradient_checkpointing": True,  # trl and unsloth; tuneforge follows its acceleration plan
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "max_length": MAX_LEN,
        "seed": 0,
        "train_sampling_strategy": "sequential",
    }
    lora = {"r": LORA_R, "lora_alpha": 2 * LORA_R, "lora_dropout": 0.0, "target_modules": "all-linear"}
    if opts.runner == "tuneforge":
        from tuneforge_trainer import acceleration as accel
        from tuneforge_trainer import config_mapping as cm

        spec = tuneforge_spec(opts.precision)
        kwargs, plan = tuneforge_config(
            spec,
            common,
            len(dataset),
            accel.detect_environment(),
            accel.read_model_shape(Path(opts.model_dir)),
        )
        print(plan.summary(), file=sys.stderr, flush=True)
        quant = cm.quantization_config_kwargs(spec)
        trainer = SFTTrainer(
            model=opts.model_dir,
            args=SFTConfig(**kwargs),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=LoraConfig(**cm.lora_config_kwargs(spec)),
            quantization_config=BitsAndBytesConfig(**quant) if quant else None,
            callbacks=[timer],
        )
        trainer.tuneforge_plan = plan
        return trainer
    if opts.runner == "unsloth":
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(
            opts.model_dir, load_in_4bit=qlora, max_seq_length=MAX_LEN
        )
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = FastLanguageModel.get_peft_model(
            model, r=LORA_R, lora_alpha=2 * LORA_R, target_modules=targets, use_gradient_checkpointing=True
        )
        return SFTTrainer(
            model=model,
            args=SFTConfig(**common),
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[timer],
        )
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype="bfloat16",
    )
    common["model_init_kwargs"] = {"dtype": "bfloat16"}
    return SFTTrainer(
        model=opts.model_dir,
        args=SFTConfig(**common),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(**lora),
        quantization_config=quant if qlora else None,
        callbacks=[timer],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="1b")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--examples-per-step", type=int, default=8)
    parser.add_argument("--precision", choices=["nf4", "bf16"], default="nf4")
    parser.add_argument("--runners", default="trl,unsloth,tuneforge")
    parser.add_argument("--write", action="store_true", help=f"append the table to {RESULTS.name}")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)  # internal: a child process's options (JSON)
    args = parser.parse_args(argv)

    if args.run_one:
        print("RESULT " + json.dumps(run_one(Options(**json.loads(args.run_one)))), flush=True)
        return 0
    dims = MODELS[args.model]
    print(formula_text(dims))
    card = gpu_name()
    if card is None:
        print("no GPU available: the throughput benchmark needs one; nothing measured")
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-model-") as model_dir:
        build_model(dims, Path(model_dir))
        for runner in args.runners.split(","):
            opts = Options(
                runner, args.model, model_dir, args.steps, args.warmup, args.examples_per_step, args.precision
            )
            rows.append(_run_child(opts))
            print(json.dumps(rows[-1]), flush=True)
    table = markdown_table(rows)
    print(table)
    if args.write:
        setup = f"{dims.name} dims, {args.precision}, {args.examples_per_step} examples/step"
        title = f"## {dt.date.today().isoformat()}, {card}: {setup}"
        with open(RESULTS, "a") as fh:
            fh.write(f"\n{title}\n\n{formula_text(dims)}\n\n{table}\n")
    return 0


def _run_child(opts: Options) -> dict[str, Any]:
    opts.launched_at = time.time()
    command = [sys.executable, __file__, "--run-one", json.dumps(asdict(opts))]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    reason = "not installed" if "No module named" in done.stderr else f"failed (exit {done.returncode})"
    print(done.stderr[-2000:], file=sys.stderr)
    return {"runner": opts.runner, "error": reason}


if __name__ == "__main__":
    sys.exit(main())
