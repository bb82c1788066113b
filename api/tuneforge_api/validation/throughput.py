"""Training throughput by (model size class, hardware), for the dry run's time estimate.

Tokens processed per second per device (every token of every example, prompts included: the
compute grows with them; ``bench/train_throughput.py`` reports the same "real tokens/s"), plus
a fixed start-up time. Rows marked ``measured=False`` are placeholders until
``bench/train_throughput.py`` is run on that hardware and its numbers are copied here (its
"1b" and "8b" models are the size classes below). An estimate is only an estimate: data
loading, evaluation, checkpoints and queueing are not in it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tuneforge.types import TINY_MODEL_ID


@dataclass(frozen=True)
class Throughput:
    tokens_per_second: float | None
    startup_seconds: float
    measured: bool
    source: str


TABLE: dict[tuple[str, str], Throughput] = {
    # Measured 2026-11-26 on the 2-vCPU development machine (OMP_NUM_THREADS=1, as the tests run
    # it): the trainer on examples/demo_chat.jsonl, LoRA r=16, batch 4, 3 epochs: 6,720 tokens in
    # a 1.6 s train loop; the whole run (process start, model load, upload) took 14.1 s.
    ("tiny", "cpu"): Throughput(4200.0, 12.5, True, "measured: tiny model, LoRA, 2-vCPU machine, 2026-11-26"),
    # Placeholders: fill from bench/train_throughput.py (QLoRA nf4, one GPU) when a GPU is at hand.
    ("1b", "gpu"): Throughput(None, 0.0, False, "placeholder: run bench/train_throughput.py --model 1b"),
    ("8b", "gpu"): Throughput(None, 0.0, False, "placeholder: run bench/train_throughput.py --model 8b"),
}


def size_class(model: str, folder: Path | None) -> str:
    """tiny, 1b or 8b, from the parameter count a model's config.json implies."""
    if model == TINY_MODEL_ID:
        return "tiny"
    try:
        config = json.loads((folder / "config.json").read_text()) if folder else {}
    except (OSError, ValueError):
        config = {}
    hidden = config.get("hidden_size", 0)
    layers = config.get("num_hidden_layers", 0)
    vocab = config.get("vocab_size", 0)
    params = 12 * layers * hidden * hidden + 2 * vocab * hidden  # the usual transformer estimate
    if params and params < 100e6:
        return "tiny"
    return "1b" if params < 4e9 else "8b"


def estimate(tokens: int | None, klass: str, gpus: int, nodes: int) -> dict:
    """Seconds to process ``tokens`` (every epoch's) on the job's hardware, with how sure it is."""
    hardware = "gpu" if gpus else "cpu"
    row = TABLE.get((klass, hardware))
    devices = max(1, gpus) * nodes if gpus else 1
    note = (
        "An estimate from a throughput table, not a promise: it assumes the table's throughput, "
        "scales linearly with the number of GPUs, and leaves out queueing, evaluation and checkpoints."
    )
    if row is None or row.tokens_per_second is None or tokens is None:
        why = "no throughput is known for this model size and hardware" if row is None else row.source
        return {
            "seconds": None,
            "tokens_per_second": None,
            "hardware": hardware,
            "size_class": klass,
            "measured": False,
            "note": f"No estimate: {why}. {note}",
        }
    rate = row.tokens_per_second * devices
    return {
        "seconds": round(row.startup_seconds + tokens / rate, 1),
        "tokens_per_second": rate,
        "hardware": hardware,
        "size_class": klass,
        "measured": row.measured,
        "note": f"{note} Source: {row.source}.",
    }
