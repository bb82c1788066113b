"""The pure parts of bench/train_throughput.py: FLOP formula, MFU, synthetic data (no GPU needed)."""

from __future__ import annotations

import statistics

import pytest

from tests.bench.loader import load_bench

bench = load_bench("train_throughput.py", "train_throughput")


@pytest.mark.parametrize(("key", "billions"), [("1b", 1.236), ("8b", 8.030)])
def test_parameter_counts_match_a_real_llama(key: str, billions: float) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = bench.MODELS[key]
    config = LlamaConfig(**dims.llama_config_kwargs())
    with torch.device("meta"):  # shapes only, no memory
        model = LlamaForCausalLM(config)
    assert dims.total_params == sum(p.numel() for p in model.parameters())
    assert dims.total_params / 1e9 == pytest.approx(billions, abs=0.001)
    # N counts the LM head's matmul even when its weight is the (tied) embedding.
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert bench.matmul_params(dims) == linear


def test_lora_flops_are_4n_per_token_plus_attention() -> None:
    dims = bench.MODELS["1b"]
    n, attention = bench.matmul_params(dims), 12 * dims.layers * dims.hidden
    assert bench.step_flops(dims, [1000]) == 4 * n * 1000 + attention * 1000**2
    assert bench.step_flops(dims, [1000], lora=False) == 6 * n * 1000 + attention * 1000**2
    # Attention grows with each sequence's own length: two halves cost less than one whole.
    assert bench.step_flops(dims, [500, 500]) < bench.step_flops(dims, [1000])
    assert bench.step_flops(dims, [300, 700]) == bench.step_flops(dims, [300]) + bench.step_flops(dims, [700])


def test_mfu_and_peak_lookup() -> None:
    assert bench.mfu(494.5e12, 1.0, 989e12) == pytest.approx(0.5)
    assert bench.mfu(989e12, 2.0, 989e12) == pytest.approx(0.5)
    assert bench.peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
    assert bench.peak_flops_for("NVIDIA H100 PCIe") == 756e12
    assert bench.peak_flops_for("NVIDIA H200") == 989e12
    assert bench.peak_flops_for("Tesla T4") is None


def test_formula_is_printed_with_the_models_numbers() -> None:
    text = bench.formula_text(bench.MODELS["8b"])
    assert "4·N·ΣT + 12·L·d·ΣT²" in text and "N=7.505B" in text and "L=32" in text and "d=4096" in text


def test_synthetic_dataset_lengths_are_uniform_in_128_to_2048() -> None:
    lengths = bench.synthetic_lengths(4000, seed=3)
    assert min(lengths) >= 128 and max(lengths) <= 2048
    assert min(lengths) < 160 and max(lengths) > 2000  # the whole range is used
    assert statistics.mean(lengths) == pytest.approx((128 + 2048) / 2, rel=0.03)
    assert bench.synthetic_lengths(50, seed=3) == lengths[:50]  # same seed, same data
    assert bench.synthetic_lengths(50, seed=4) != lengths[:50]


def test_synthetic_tokens_are_valid_ids_and_reproducible() -> None:
    data = bench.synthetic_dataset(20, vocab=1000, seed=0)
    assert [len(x) for x in data] == bench.synthetic_lengths(20, seed=0)
    assert all(0 <= t < 1000 for seq in data for t in seq)
    assert data == bench.synthetic_dataset(20, vocab=1000, seed=0)


def test_results_table() -> None:
    rows = [
        {
            "runner": "trl",
            "tokens_per_second": 12345.6,
            "time_to_first_step": 20.04,
            "peak_memory_gib": 9.87,
            "mfu": 0.4321,
            "step0_loss": 11.76,
        },
        {"runner": "unsloth", "error": "not installed"},
    ]
    table = bench.markdown_table(rows).splitlines()
    assert table[2] == "| trl | 12346 | 20.0 | 9.9 | 43.2% | 11.7600 |"
    assert table[3].startswith("| unsloth | not installed |")


def test_without_a_gpu_it_says_so_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert bench.main([]) == 0
    out = capsys.readouterr().out
    assert "no GPU available" in out
    assert "FLOPs/step" in out


def bench_common(batch: int = 8) -> dict[str, object]:
    return {
        "output_dir": "/tmp/bench-out",
        "max_steps": 30,
        "per_device_train_batch_size": batch,
        "learning_rate": bench.LEARNING_RATE,
        "seed": 0,
        "train_sampling_strategy": "sequential",
        "max_length": bench.MAX_LEN,
    }


def bench_shape(key: str) -> object:
    from transformers import LlamaConfig

    from tuneforge_trainer.acceleration import ModelShape

    dims = bench.MODELS[key]
    config = LlamaConfig(**dims.llama_config_kwargs())  # as build_model saves it in config.json
    shape = ModelShape.from_config(config.to_dict())
    assert shape is not None and shape.total_params == dims.total_params
    return shape


def test_tuneforge_runner_trains_with_the_trainers_acceleration_plan() -> None:
    from tuneforge_trainer.acceleration import Environment

    h100 = Environment(
        cuda=True,
        compute_capability=(9, 0),
        gpu_memory_bytes=80 * 2**30,
        flash_attn="2.8.3.post2",
        liger_kernel="0.8.5",
    )
    spec = bench.tuneforge_spec("nf4")
    kwargs, plan = bench.tuneforge_config(spec, bench_common(), 240, h100, bench_shape("1b"))
    assert kwargs["model_init_kwargs"] == {"dtype": "bfloat16", "attn_implementation": "flash_attention_2"}
    assert kwargs["use_liger_kernel"] is True
    assert kwargs["gradient_checkpointing"] is False  # 1B QLoRA, 8 x 2048 tokens fits an H100
    assert plan.summary().startswith("acceleration: flash_attention_2")
    # Held to the benchmark's settings, the max length included (the mapping's default is 1024).
    assert kwargs["max_length"] == bench.MAX_LEN == 2048
    common = bench_common()
    assert {k: kwargs[k] for k in ("max_steps", "per_device_train_batch_size", "learning_rate")} == {
        k: common[k] for k in ("max_steps", "per_device_train_batch_size", "learning_rate")
    }
    # The 8B does not fit without checkpointing; a machine without the kernels gets sdpa, no Liger.
    kwargs, _ = bench.tuneforge_config(spec, bench_common(), 240, h100, bench_shape("8b"))
    assert kwargs["gradient_checkpointing"] is True
    bare = Environment(cuda=True, compute_capability=(9, 0), gpu_memory_bytes=80 * 2**30)
    kwargs, _ = bench.tuneforge_config(spec, bench_common(), 240, bare, bench_shape("1b"))
    assert "attn_implementation" not in kwargs["model_init_kwargs"] and "use_liger_kernel" not in kwargs
