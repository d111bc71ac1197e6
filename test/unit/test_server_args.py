"""ServerArgs: refused flags, and the per-GPU default attention backends (decision logic, hardware faked)."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch

from sglx.srt import server_args as sa_mod
from sglx.srt.server_args import ServerArgs, default_attention_backends, resolve_attention_backends


def fake_flashinfer(monkeypatch, installed: bool) -> None:
    """Make `importlib.util.find_spec("flashinfer")` say whether flashinfer is installed."""
    real = importlib.util.find_spec
    monkeypatch.setattr(sa_mod.importlib.util, "find_spec",
                        lambda name, *a: (object() if installed else None) if name == "flashinfer" else real(name, *a))


@pytest.mark.parametrize("kw,flag", [({"tp_size": 2}, "--tp-size"), ({"speculative_algorithm": "EAGLE"}, "--speculative"),
                                     ({"skip_tokenizer_init": True}, "--skip-tokenizer-init")])
def test_unsupported_flags_are_refused_not_ignored(kw, flag):
    with pytest.raises(ValueError, match=flag):
        ServerArgs(device="cpu", **kw)


@pytest.mark.parametrize("value", [0.0, -1.0])
def test_schedule_conservativeness_must_be_positive(value):
    with pytest.raises(ValueError, match="--schedule-conservativeness must be > 0"):
        ServerArgs(device="cpu", schedule_conservativeness=value).validate()


def test_cpu_defaults_to_torch_native():
    args = ServerArgs(device="cpu")
    assert (args.prefill_attention_backend, args.decode_attention_backend) == ("torch_native", "torch_native")


@pytest.mark.parametrize("major,has_flashinfer,want", [
    (9, True, ("fa3", "triton")), (9, False, ("triton", "triton")), (8, True, ("triton", "triton")),
    (10, True, ("triton", "triton")),
])
def test_gpu_default_by_capability_and_flashinfer(monkeypatch, major, has_flashinfer, want):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    fake_flashinfer(monkeypatch, has_flashinfer)
    assert default_attention_backends("cuda") == want


def test_resolution_keeps_what_the_user_named(monkeypatch):
    monkeypatch.setattr(sa_mod, "default_attention_backends", lambda device: ("fa3", "triton"))
    args = ServerArgs(device="cpu")
    args.device, args.prefill_attention_backend, args.decode_attention_backend = "cuda", None, "flashinfer"
    resolve_attention_backends(args)
    assert (args.prefill_attention_backend, args.decode_attention_backend) == ("fa3", "flashinfer")


# ------------------------------------------------------------------------------------------ --sampling-backend
@pytest.mark.parametrize("device,has_flashinfer,want", [
    ("cpu", True, "pytorch"), ("cuda", True, "flashinfer"), ("cuda:1", True, "flashinfer"), ("cuda", False, "pytorch"),
])
def test_sampling_backend_default(monkeypatch, device, has_flashinfer, want):
    fake_flashinfer(monkeypatch, has_flashinfer)
    assert ServerArgs(device=device).sampling_backend == want


@pytest.mark.parametrize("device,backend", [("cpu", "pytorch"), ("cuda", "pytorch"), ("cuda", "flashinfer"),
                                            ("cuda:1", "flashinfer")])
def test_sampling_backend_accepted(device, backend):
    assert ServerArgs(device=device, sampling_backend=backend).sampling_backend == backend


@pytest.mark.parametrize("name", ["torch", "FlashInfer", "triton", ""])
def test_unknown_sampling_backend_is_refused(name):
    with pytest.raises(ValueError, match="--sampling-backend must be one of pytorch, flashinfer"):
        ServerArgs(device="cpu", sampling_backend=name)


def test_flashinfer_sampling_on_cpu_is_refused():
    with pytest.raises(ValueError, match=r"--sampling-backend flashinfer needs a CUDA GPU \(--device is cpu\)"):
        ServerArgs(device="cpu", sampling_backend="flashinfer")


def test_sampling_backend_cli_flag():
    args = sa_mod.prepare_server_args(["--device", "cuda", "--sampling-backend", "flashinfer"])
    assert args.sampling_backend == "flashinfer"
    assert sa_mod.prepare_server_args(["--device", "cpu"]).sampling_backend == "pytorch"


@pytest.mark.parametrize("device,given,expected", [("cuda", None, 1), ("cuda", 3, 3), ("cpu", 2, 2), ("cpu", None, None)])
def test_host_threads(monkeypatch, device, given, expected):
    """--num-threads wins; otherwise one thread on CUDA (the host only launches kernels), torch's default on CPU."""
    import torch

    from sglx.srt.model_executor import model_runner

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    model_runner.set_host_threads(torch.device(device), given)
    assert calls == ([] if expected is None else [expected])


def test_quantization_and_prefill_budget_cli_flags():
    args = sa_mod.prepare_server_args(["--device", "cpu", "--quantization", "fp8", "--max-prefill-tokens", "4096"])
    assert args.quantization == "fp8" and args.max_prefill_tokens == 4096
    plain = sa_mod.prepare_server_args(["--device", "cpu"])
    assert plain.quantization is None and plain.max_prefill_tokens is None  # resolved by the scheduler
    with pytest.raises(ValueError, match="--quantization must be one of fp8"):
        sa_mod.prepare_server_args(["--device", "cpu", "--quantization", "awq"])


@pytest.mark.parametrize("kw,flag", [
    ({"attention_backend": "bogus"}, "--attention-backend"), ({"decode_attention_backend": "fa4"}, "--decode-attention"),
    ({"prefill_attention_backend": "Triton"}, "--prefill-attention"), ({"dtype": "float8"}, "--dtype"),
    ({"kv_cache_dtype": "fp8"}, "--kv-cache-dtype"),  # a typo used to fall back to the model's dtype silently
])
def test_unknown_names_are_refused_at_parse_time(kw, flag):
    """Refused by the launcher with the choices, not by the scheduler after the processes are up."""
    with pytest.raises(ValueError, match=f"{flag}.* must be .*one of"):
        ServerArgs(device="cpu", **kw)


@pytest.mark.parametrize("kw", [{"attention_backend": "triton"}, {"decode_attention_backend": "fa3"},
                                {"dtype": "bf16"}, {"kv_cache_dtype": "fp8_e4m3"}, {"kv_cache_dtype": "auto"}])
def test_known_names_are_accepted(kw):
    ServerArgs(device="cpu", **kw)


def test_a_port_in_use_fails_before_anything_loads():
    import socket

    from sglx.launch_server import bind_http_socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(RuntimeError, match=f"cannot listen on 127.0.0.1:{port}"):
            bind_http_socket("127.0.0.1", port)
    finally:
        taken.close()
    sock = bind_http_socket("127.0.0.1", port)  # free again: bound, and uvicorn listens on it
    assert sock.getsockname()[1] == port
    sock.close()


def test_plugins_register_backends_that_the_launcher_accepts(tmp_path, monkeypatch):
    """SGLX_PLUGINS modules are imported where backend names are read, so a plugin's backend passes the
    parse-time check and is built by name; a module that cannot be imported fails with its name."""
    from sglx.srt.layers.attention import registry

    (tmp_path / "my_sglx_plugin.py").write_text(
        "from sglx.srt.layers.attention.registry import ATTENTION_BACKENDS, register_attention_backend\n"
        "@register_attention_backend('my_backend')\n"
        "def make(runner):\n"
        "    return ('built for', runner)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "ATTENTION_BACKENDS", dict(registry.ATTENTION_BACKENDS))
    with pytest.raises(ValueError, match="my_backend"):
        ServerArgs(device="cpu", attention_backend="my_backend")
    monkeypatch.setenv("SGLX_PLUGINS", " my_sglx_plugin ,")
    assert "my_backend" in registry.attention_backend_names()
    assert ServerArgs(device="cpu", attention_backend="my_backend").attention_backend == "my_backend"
    assert registry.create_attention_backend("my_backend", "runner") == ("built for", "runner")
    monkeypatch.setenv("SGLX_PLUGINS", "no_such_sglx_plugin")
    with pytest.raises(ImportError, match="no_such_sglx_plugin"):
        registry.attention_backend_names()


@pytest.mark.parametrize("kw,needle", [
    ({"max_running_requests": 0}, "--max-running-requests must be >= 1"),  # once: every request waited forever
    ({"max_running_requests": -3}, "--max-running-requests must be >= 1"),
    ({"context_length": 0}, "--context-length must be >= 2"),
    ({"context_length": -1}, "--context-length must be >= 2"),
    ({"max_total_tokens": -5}, "--max-total-tokens must be >= 1"),
    ({"port": 70000}, "--port must be in 1..65535"),
    ({"log_level": "bogus"}, "--log-level must be one of"),
    ({"watchdog_timeout": 0}, "--watchdog-timeout"),
    ({"num_threads": 0}, "--num-threads"),
])
def test_nonsense_sizes_are_refused_by_flag(kw, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        ServerArgs(device="cpu", **kw)


def test_what_the_machine_cannot_do_fails_before_anything_starts(monkeypatch, tmp_path):
    """check_launchable (called before the scheduler process starts): a CUDA device without CUDA, a GPU-only
    attention backend on the CPU, a local model or tokenizer path that does not exist."""
    monkeypatch.setattr(sa_mod, "_cuda_available", lambda: False)
    with pytest.raises(RuntimeError, match="--device cuda, but this torch"):
        ServerArgs(device="cuda").check_launchable()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for backend in ("flashinfer", "fa3", "triton"):
        with pytest.raises(RuntimeError, match=f"--attention-backend {backend} needs a CUDA GPU"):
            ServerArgs(device="cpu", attention_backend=backend).check_launchable()
    with pytest.raises(RuntimeError, match="--decode-attention-backend fa3"):
        ServerArgs(device="cpu", decode_attention_backend="fa3").check_launchable()
    missing = str(tmp_path / "nope")
    with pytest.raises(RuntimeError, match="--model-path .*nope: no such file"):
        ServerArgs(device="cpu", model_path=missing).check_launchable()
    with pytest.raises(RuntimeError, match="--tokenizer-path .*nope: no such file"):
        ServerArgs(device="cpu", tokenizer_path=missing).check_launchable()
    ServerArgs(device="cpu").check_launchable()  # the default model, on the CPU
    ServerArgs(device="cpu", model_path="org/some-repo-id", tokenizer_path="org/x").check_launchable()  # not local
