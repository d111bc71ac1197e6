"""A small OpenAI-compatible client (requests) with retries, and a threaded map with a progress bar.

Transient failures (connection refused/reset, timeouts, HTTP 408/429/5xx, an answer the server
aborted: finish_reason "abort") are retried with exponential backoff; any other 4xx is the caller's
mistake (wrong model name, bad parameter) and is raised at once as `ServerError`, which stops the
whole run.
"""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, TypeVar

import requests
from tqdm import tqdm

from sglx.evals.common import EvalError, chat_messages

T = TypeVar("T")


class ServerError(EvalError):
    """The server refused a request (4xx); retrying would not help."""


@dataclass
class SamplerConfig:
    base_url: str  # http://host:port, with or without a trailing /v1
    model: Optional[str] = None
    api: str = "chat"  # "chat" -> /v1/chat/completions, "completion" -> /v1/completions
    max_tokens: int = 2048
    temperature: float = 0.0
    top_p: float = 1.0
    max_retries: int = 3
    retry_backoff_s: float = 1.0
    timeout_s: float = 600.0
    api_key: Optional[str] = None


def normalize_base_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not re.match(r"^https?://", url):
        url = "http://" + url
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _connection_reason(exc: Exception) -> str:
    m = re.search(r"\[Errno -?\d+\] ([^'\"\)]+)", str(exc))
    if m:
        return m.group(1).strip()
    return "timed out" if isinstance(exc, requests.Timeout) else type(exc).__name__


def _error_message(resp: requests.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return _one_line(resp.text) or resp.reason or ""
    if isinstance(body, dict):
        err = body.get("error", body.get("detail", body.get("message", body)))
        if isinstance(err, dict):
            err = err.get("message", err)
        return _one_line(str(err))
    return _one_line(str(body))


class OpenAIClient:
    def __init__(self, cfg: SamplerConfig):
        self.cfg = cfg
        self.base_url = normalize_base_url(cfg.base_url)
        self._local = threading.local()  # requests.Session is not thread-safe: one per thread

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            s = requests.Session()
            if self.cfg.api_key:
                s.headers["Authorization"] = f"Bearer {self.cfg.api_key}"
            self._local.session = s
        return self._local.session

    def _request(self, method: str, path: str, payload: Optional[Dict[str, Any]] = None,
                 aborted: Callable[[Any], bool] = lambda body: False) -> Dict[str, Any]:
        """The JSON body of a successful answer, retrying transient failures; `aborted(body)` true marks an
        answer the server cut short, retried the same way."""
        url = self.base_url + path
        last = ""
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                time.sleep(self.cfg.retry_backoff_s * 2 ** (attempt - 1))
            try:
                resp = self._session().request(method, url, json=payload, timeout=self.cfg.timeout_s)
            except requests.ReadTimeout:
                last = f"no answer from {url} within --request-timeout {self.cfg.timeout_s:g} s"
                continue
            except (requests.ConnectionError, requests.Timeout) as e:
                last = f"cannot reach server at {url}: {_connection_reason(e)}"
                continue
            if resp.status_code < 400:
                try:
                    body = resp.json()
                except ValueError:
                    raise EvalError(f"{url} returned non-JSON: {_one_line(resp.text, 100)!r}") from None
                if not aborted(body):
                    return body
                last = f"{url}: the server aborted the request (finish_reason abort)"
                continue
            msg = f"HTTP {resp.status_code} from {url}: {_error_message(resp)}"
            if resp.status_code not in (408, 429) and resp.status_code < 500:
                raise ServerError(msg)
            last = msg
        tries = self.cfg.max_retries + 1
        raise EvalError(f"{last} (after {tries} attempt{'s' if tries > 1 else ''})")

    def list_models(self) -> List[str]:
        body = self._request("GET", "/v1/models")
        try:
            return [m["id"] for m in body["data"]]
        except (KeyError, TypeError):
            raise EvalError(f"unexpected /v1/models reply from {self.base_url}") from None

    def default_model(self) -> str:
        models = self.list_models()
        if not models:
            raise EvalError(f"server at {self.base_url} lists no models; pass --model")
        return models[0]

    def sample(self, prompt: str, stop: Sequence[str] = ()) -> str:
        """One generation for `prompt` (a user message with api=chat, a raw prompt otherwise)."""
        cfg = self.cfg
        payload: Dict[str, Any] = {
            "model": cfg.model,
            "max_tokens": cfg.max_tokens,
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
        }
        if stop:
            payload["stop"] = list(stop)
        if cfg.api == "chat":
            payload["messages"] = chat_messages(prompt)
        else:
            payload["prompt"] = prompt
        path = "/v1/chat/completions" if cfg.api == "chat" else "/v1/completions"
        # An aborted answer (the server's /abort_request, an overload) is cut short: never graded, retried.
        body = self._request("POST", path, payload, aborted=_aborted)
        try:
            choice = body["choices"][0]
            return (choice["message"]["content"] if cfg.api == "chat" else choice["text"]) or ""
        except (KeyError, IndexError, TypeError):
            raise EvalError(f"unexpected reply shape from {self.base_url}: {_one_line(str(body), 120)}") from None


def _aborted(body: Any) -> bool:
    try:
        return body["choices"][0].get("finish_reason") == "abort"
    except (KeyError, IndexError, TypeError, AttributeError):
        return False  # a malformed body: sample() reports its shape


def map_with_progress(fn: Callable[[int], T], n: int, num_threads: int, desc: str = "") -> List[T]:
    """[fn(0), ..., fn(n-1)] on a thread pool; the first exception cancels what has not started."""
    results: List[Any] = [None] * n
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        futures = {pool.submit(fn, i): i for i in range(n)}
        try:
            # The bar is closed (its line ended) before any error is printed below it.
            with tqdm(total=n, desc=desc) as bar:
                for fut in as_completed(futures):
                    results[futures[fut]] = fut.result()
                    bar.update(1)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return results
