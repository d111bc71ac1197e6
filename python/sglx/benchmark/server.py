"""What the benchmark learns from the server before the run: reachability, model name, tokenizer."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional

import requests

from sglx.benchmark import BenchError

_PROBE_TIMEOUT_S = 10.0


def resolve_base_url(base_url: Optional[str], host: str, port: int) -> str:
    if base_url:
        return base_url.rstrip("/")
    if "://" in host:  # `--host http://localhost` is common enough in copied commands to accept
        return f"{host.rstrip('/')}:{port}"
    return f"http://{host}:{port}"


def auth_headers() -> dict[str, str]:
    key = os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


@dataclass
class ServerInfo:
    model_path: Optional[str] = None
    tokenizer_path: Optional[str] = None
    served_models: list[str] = field(default_factory=list)


def _get_json(url: str) -> Optional[Any]:
    """JSON body of a 200 answer, None for any other answer; raises BenchError only if nothing answers."""
    try:
        resp = requests.get(url, headers=auth_headers(), timeout=_PROBE_TIMEOUT_S)
    except requests.ConnectionError:
        raise BenchError(f"cannot reach the server at {url.rsplit('/', 1)[0]} (connection failed)") from None
    except requests.Timeout:
        raise BenchError(f"the server at {url} did not answer within {_PROBE_TIMEOUT_S:.0f}s") from None
    except requests.RequestException as e:  # not a URL at all: no scheme, a port that is not a number, ...
        raise BenchError(f"cannot use {url.rsplit('/', 1)[0]!r} as the server's URL: {e}") from None
    if resp.status_code != 200:
        return None
    try:
        return resp.json()
    except ValueError:
        return None


def probe_server(base_url: str) -> ServerInfo:
    info = ServerInfo()
    model_info = _get_json(f"{base_url}/get_model_info")
    if isinstance(model_info, dict):
        info.model_path = model_info.get("model_path")
        info.tokenizer_path = model_info.get("tokenizer_path")
        if model_info.get("served_model_name"):
            info.served_models.append(str(model_info["served_model_name"]))
    models = _get_json(f"{base_url}/v1/models")
    if isinstance(models, dict):
        listed = [str(m["id"]) for m in models.get("data") or [] if isinstance(m, dict) and "id" in m]
        # /v1/models first: its first id is what SGLang's benchmark picks by default.
        info.served_models = listed + [m for m in info.served_models if m not in listed]
    return info


def choose_model(requested: Optional[str], info: ServerInfo, base_url: str) -> str:
    """The name sent in OpenAI requests: --model, else the server's first listed model, else its model path.
    A --model the server does not serve is refused here, before the run, rather than as N failed requests."""
    known = set(info.served_models)
    if info.model_path:
        known |= {info.model_path, os.path.basename(info.model_path)}
    if requested:
        if known and requested not in known:
            listed = ", ".join(info.served_models or [info.model_path or ""])
            raise BenchError(f"model {requested!r} is not served at {base_url} (it serves: {listed})")
        return requested
    if info.served_models:
        return info.served_models[0]
    if info.model_path:
        return info.model_path
    raise BenchError(f"cannot tell which model {base_url} serves; pass --model")


def _gguf_cache_dir(gguf_path: str) -> str:
    st = os.stat(gguf_path)
    key = hashlib.sha256(f"{os.path.abspath(gguf_path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]
    root = os.environ.get("SGLX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "sglx")
    return os.path.join(root, "gguf-tokenizers", key)


def _load_gguf_tokenizer(path: str) -> Any:
    """Rebuilding a tokenizer from GGUF metadata takes transformers several seconds; the converted tokenizer is
    saved once (keyed by file identity) and reloaded from its tokenizer.json afterwards."""
    from transformers import AutoTokenizer

    cache = _gguf_cache_dir(path)
    if os.path.isfile(os.path.join(cache, "tokenizer.json")):
        try:
            return AutoTokenizer.from_pretrained(cache)
        except Exception:  # a damaged cache entry: fall back to the GGUF itself
            pass
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path))
    tmp = None
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(cache))
        tok.save_pretrained(tmp)
        os.replace(tmp, cache)  # atomic: a concurrent reader sees the whole entry or none
        tmp = None
    except OSError:
        pass  # the cache is an optimisation; a read-only home (or a racing writer) must not fail the run
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return tok


def _lone_gguf(path: str) -> Optional[str]:
    """A model directory holding one GGUF file and no tokenizer files means that GGUF (the default model's
    package directory is one)."""
    if not os.path.isdir(path) or os.path.exists(os.path.join(path, "tokenizer_config.json")):
        return None
    ggufs = [f for f in os.listdir(path) if f.endswith(".gguf")]
    return os.path.join(path, ggufs[0]) if len(ggufs) == 1 else None


def load_tokenizer(name: str) -> Any:
    """AutoTokenizer from an HF id, a directory, or a GGUF file (the default sglx model is one)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise BenchError("the 'transformers' package is needed to load a tokenizer") from None
    if os.path.isabs(name) or name.startswith("."):
        if not os.path.exists(name):
            raise BenchError(f"tokenizer path not found: {name} (pass --tokenizer)")
        gguf = _lone_gguf(name)
        if gguf:
            name = gguf
    try:
        if name.endswith(".gguf") and os.path.isfile(name):
            return _load_gguf_tokenizer(name)
        return AutoTokenizer.from_pretrained(name)
    except Exception as e:  # transformers raises many types (OSError, ValueError, HF hub errors) for a bad name
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BenchError(f"cannot load tokenizer {name!r}: {reason}") from None


def flush_cache(base_url: str) -> None:
    try:
        resp = requests.post(f"{base_url}/flush_cache", headers=auth_headers(), timeout=_PROBE_TIMEOUT_S)
    except requests.RequestException as e:
        raise BenchError(f"--flush-cache: request failed: {type(e).__name__}") from None
    if resp.status_code != 200:
        raise BenchError(f"--flush-cache: server answered HTTP {resp.status_code}")
