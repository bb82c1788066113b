"""`make demo`: start Tuneforge on its embedded defaults and fine-tune the tiny model end to end.

1. starts `tuneforge up` (SQLite, file:// storage, local executor, Redis or an embedded one)
   with its state in .tuneforge-demo/;
2. uploads examples/demo_chat.jsonl (64 chat examples about a made-up country);
3. fine-tunes `tuneforge/tiny-llama` with LoRA, showing the trainer's progress;
4. downloads the adapter, loads it with peft, and compares the base model's answer with
   the fine-tuned model's for a question from the training set.

Nothing is downloaded: the base model and its tokenizer are built locally.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from tuneforge import Client, Job

ROOT = Path(__file__).resolve().parents[1]
HOME = ROOT / ".tuneforge-demo"
DATA = ROOT / "examples" / "demo_chat.jsonl"
QUESTION = "What is the capital of Tuneland?"
console = Console()


def pick_port(preferred: int = 8000) -> int:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]


def start_service(port: int, api_key: str) -> subprocess.Popen[bytes]:
    HOME.mkdir(exist_ok=True)
    env = {**os.environ, "TUNEFORGE_HOME": str(HOME), "TUNEFORGE_API_KEY": api_key}
    log = open(HOME / "service.log", "ab")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "tuneforge"), "up", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    with console.status(f"starting Tuneforge on {url} (state in {HOME.relative_to(ROOT)}/)"):
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    return proc
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                sys.exit(f"Tuneforge did not start; see {HOME / 'service.log'}")
            time.sleep(0.2)


def follow(client: Client, job: Job) -> Job:
    """A progress bar fed by the job's metrics events, until the job ends."""
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(f"{job.status.value}", total=None, info="")
        while not job.status.is_finished():
            time.sleep(0.5)
            job = client.jobs.get(job.id)
            latest = client.jobs.list_events(job.id, limit=1).data
            data = latest[0].data if latest and latest[0].type == "metrics" else None
            if data and "step" in data:
                loss = data.get("train_loss", 0.0)
                info = f"step {data['step']}/{data.get('total_steps', '?')}  loss {loss:.3f}"
                bar.update(task, total=data.get("total_steps"), completed=data["step"], info=info)
            bar.update(task, description=job.status.value)
    return job


def answer(model, tokenizer, question: str) -> str:
    import torch

    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def compare(adapter_dir: Path) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    # peft imports bitsandbytes, which on CPUs with AVX512-BF16 tries the hub's `kernels`
    # package (not installed: nothing is downloaded) and warns that it is missing; the tiny
    # model runs in fp32 and never needs it.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from tuneforge_trainer.tiny_model import ensure_tiny_model

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    base_dir = ensure_tiny_model(HOME / "cache" / "models")
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    before = answer(AutoModelForCausalLM.from_pretrained(base_dir), tokenizer, QUESTION)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    after = answer(tuned, tokenizer, QUESTION)
    table = Table(title=f"Q: {QUESTION}")
    table.add_column("model")
    table.add_column("greedy answer")
    table.add_row("base tuneforge/tiny-llama", repr(before))
    table.add_row("after LoRA fine-tuning", repr(after))
    console.print(table)


def main() -> int:
    api_key = "tf-demo-" + secrets.token_urlsafe(24)
    port = pick_port()
    proc = start_service(port, api_key)
    try:
        client = Client(base_url=f"http://127.0.0.1:{port}", api_key=api_key)
        f = client.files.upload(DATA)
        console.print(f"uploaded [bold]{DATA.name}[/]: {f.id} ({f.bytes} bytes)")
        job = client.create_job(
            model="tuneforge/tiny-llama",
            training_file=f.id,
            method="supervised",
            hyperparameters={"n_epochs": 8, "batch_size": 4},
            seed=0,
            suffix="demo",
        )
        console.print(f"created [bold]{job.id}[/] ({job.method['type']}, {job.hyperparameters})")
        job = follow(client, job)
        if job.status.value != "succeeded":
            for event in client.jobs.events(job.id):
                console.print(f"  [{event.level}] {event.message}")
            console.print(f"[red]job {job.status.value}: {job.error}[/]")
            return 1
        console.print(f"[green]succeeded[/]: {job.fine_tuned_model} ({job.trained_tokens} trained tokens)")
        adapter_dir = client.adapters.download(job.id, HOME / "adapters" / job.id)
        console.print(
            f"adapter downloaded to {adapter_dir.relative_to(ROOT)}/: "
            f"{', '.join(sorted(p.name for p in adapter_dir.iterdir()))}"
        )
        compare(adapter_dir)
        return 0
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
