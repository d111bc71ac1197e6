"""Engine helpers shared by the GPU benchmark scripts (bench_embedding.py, bench_roofline.py,
bench_serving_backends.sh): a tokenizer for config-only model directories, an Engine whose calls cannot hang,
random prompts, JSON-lines output and the command-line options every engine benchmark takes."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import shutil
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from sglx.srt.configs.model_config import ModelConfig
from sglx.srt.server_args import ServerArgs

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json")


# ------------------------------------------------------------------------------------- options
SCHEDULES = ("overlap", "sync")  # sync: --disable-overlap-schedule


def add_engine_args(p: argparse.ArgumentParser, model_path: str) -> None:
    """The model and device options of an engine benchmark (dummy bf16 weights of `model_path` by default)."""
    p.add_argument("--model-path", default=model_path)
    p.add_argument("--tokenizer-path", default=None, help="default: the model's, else a synthetic one")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default=None)
    p.add_argument("--quantization", default=None, help="online weight quantization, e.g. fp8")


def add_schedule_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--schedule", nargs="+", choices=SCHEDULES, default=["overlap"],
                   help="scheduler modes, one Engine each: overlap (the default) or sync (--disable-overlap-schedule)")


# ------------------------------------------------------------------------------------- engine helpers
def has_tokenizer(model_path: str) -> bool:
    return model_path.lower().endswith(".gguf") or any(
        os.path.isfile(os.path.join(model_path, f)) for f in TOKENIZER_FILES)


def synthetic_tokenizer(vocab_size: int) -> str:
    """A word-level tokenizer with one token per model id ("<17>"), saved to a temp dir. The Engine loads a
    tokenizer in three processes (--skip-tokenizer-init is refused: not supported yet) and the benchmark
    configs ship config.json only; prompts are ids, and outputs only need to decode, so any tokenizer that
    covers the vocabulary will do."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tempfile.mkdtemp(prefix="sglx_bench_tok_")
    atexit.register(shutil.rmtree, path, True)
    tok = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(vocab_size)}, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(path)
    return path


def resolve_tokenizer(model_path: str, tokenizer_path: Optional[str]) -> Optional[str]:
    """The given tokenizer, the model's own, or a synthetic one covering the model's vocabulary."""
    if tokenizer_path or has_tokenizer(model_path):
        return tokenizer_path
    return synthetic_tokenizer(ModelConfig.from_path(model_path).vocab_size)


class EngineDied(RuntimeError):
    pass


class GuardedEngine:
    """An sglx.Engine whose calls cannot hang and fail one way: Engine itself raises when a child process dies
    (a CUDA OOM, say); this adds a per-call timeout (a watcher thread stops the engine's event loop) and turns
    either into EngineDied, which the benchmarks record as an error and move on."""

    def __init__(self, server_args: ServerArgs, call_timeout_s: float = 0.0) -> None:
        import sglx

        self.server_args = server_args
        self.call_timeout_s = call_timeout_s
        self.engine = sglx.Engine(server_args=server_args)
        self.failure: Optional[str] = None

    def _dead_child(self) -> Optional[str]:
        dead = [p for p in self.engine.procs if not p.is_alive()]
        return f"{dead[0].name} died with exit code {dead[0].exitcode}" if dead else None

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.failure = self.failure or self._dead_child()
        if self.failure:
            raise EngineDied(self.failure)
        done = threading.Event()
        watcher = threading.Thread(target=self._watch, args=(done,), daemon=True)
        watcher.start()
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:
            if self.failure:
                raise EngineDied(self.failure) from e
            raise
        finally:
            done.set()
            watcher.join()

    def _watch(self, done: threading.Event) -> None:
        t0 = time.monotonic()
        while not done.wait(0.5):
            self.failure = self._dead_child()
            if not self.failure and self.call_timeout_s and time.monotonic() - t0 > self.call_timeout_s:
                self.failure = f"an engine call took more than {self.call_timeout_s:.0f} s"
            if self.failure:
                self.engine.loop.call_soon_threadsafe(self.engine.loop.stop)
                return

    def encode(self, input_ids: List[List[int]]) -> List[Dict[str, Any]]:
        return self.call(self.engine.encode, input_ids=input_ids)

    def generate(self, input_ids: List[List[int]], sampling_params: Dict[str, Any]) -> List[Dict[str, Any]]:
        return self.call(self.engine.generate, input_ids=input_ids, sampling_params=sampling_params)

    def server_info(self) -> Dict[str, Any]:
        return self.call(self.engine.get_server_info)

    def flush_cache(self) -> bool:
        return self.call(self.engine.flush_cache)

    def shutdown(self, memory_timeout_s: float = 60.0) -> None:
        """Stop the engine and wait until its children are gone (their GPU memory with them), then close this
        process's sockets."""
        eng = self.engine
        free_before = _cuda_free_bytes()
        procs = list(eng.procs)
        eng.shutdown()  # stops the watchdog first, kills the children, cancels the receive task, closes the loop
        for p in procs:
            p.join(30)
        alive = [p.name for p in procs if p.is_alive()]
        if alive:
            raise RuntimeError(f"engine processes still alive after shutdown: {alive}")
        tm = eng.tokenizer_manager
        for sock in (getattr(tm, "recv_from_detokenizer", None), getattr(tm, "send_to_scheduler", None)):
            with contextlib.suppress(Exception):
                sock.close(0)
        _wait_cuda_memory_released(free_before, memory_timeout_s)


def _cuda_free_bytes() -> Optional[int]:
    # Only where this process already holds a CUDA context: querying would otherwise create one.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.mem_get_info()[0]
    return None


def _wait_cuda_memory_released(free_before: Optional[int], timeout_s: float) -> None:
    """The driver frees a dead process's memory shortly after it exits; the next engine profiles free
    memory at start-up, so wait until it has grown back."""
    if free_before is None:
        return
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        free, total = torch.cuda.mem_get_info()
        if free - free_before > 0.5 * (total - free_before) or free > 0.9 * total:
            return
        time.sleep(0.5)
    print(f"warning: GPU memory not released {timeout_s:.0f} s after the engine shut down", flush=True)


def append_jsonl(path: Optional[str], rec: Dict[str, Any]) -> None:
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def random_ids(gen: torch.Generator, vocab: int, lengths: Sequence[int]) -> List[List[int]]:
    flat = torch.randint(0, vocab, (sum(lengths),), generator=gen)
    return [chunk.tolist() for chunk in torch.split(flat, list(lengths))]


# ------------------------------------------------------------------------------------- workload and modes
