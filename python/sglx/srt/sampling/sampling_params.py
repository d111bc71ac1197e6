"""Per-request sampling parameters, with SGLang's names and defaults."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

_GREEDY_EPS = 1e-6
TOP_K_ALL = 1 << 30
LOGIT_BIAS_MAX = 100.0
_TOKEN_ID_KEY = re.compile(r"-?[0-9]+")
# n (parallel samples of one prompt) at most this, OpenAI's limit: each sample becomes a request of its own.
MAX_PARALLEL_SAMPLES = 128


class SamplingParamsError(ValueError):
    """Raised for impossible sampling values; the HTTP layer turns it into a 400."""


@dataclass
class SamplingParams:
    max_new_tokens: Optional[int] = 128
    min_new_tokens: int = 0
    stop: Union[str, List[str], None] = None
    stop_token_ids: Optional[List[int]] = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = 1
    sampling_seed: Optional[int] = None
    logit_bias: Optional[Dict[str, float]] = None
    # Structured output (at most one): the output must match this JSON schema (a JSON string), regular
    # expression or EBNF grammar (constrained/base_grammar_backend.py).
    json_schema: Optional[str] = None
    regex: Optional[str] = None
    ebnf: Optional[str] = None
    # With --reasoning-parser: the constraint holds from the end of the reasoning on, not from the first token
    # (constrained/reasoner_grammar.py). The chat API sets it when the request thinks.
    constrain_after_reasoning: bool = False
    # Derived in normalize()
    stop_strs: List[str] = field(default_factory=list)
    stop_str_max_len: int = 0

    @classmethod
    def from_dict(cls, d: Optional[Dict[str, Any]]) -> "SamplingParams":
        d = dict(d or {})
        if "seed" in d and "sampling_seed" not in d:
            d["sampling_seed"] = d.pop("seed")
        known = {k for k in cls.__dataclass_fields__ if k not in ("stop_strs", "stop_str_max_len")}
        unknown = set(d) - known
        if unknown:
            raise SamplingParamsError(f"unknown sampling parameter(s): {sorted(unknown)}")
        try:
            sp = cls(**d)
        except TypeError as e:  # pragma: no cover - guarded by the key check above
            raise SamplingParamsError(str(e)) from e
        return sp

    @property
    def uses_penalties(self) -> bool:
        """Whether sampling depends on the ids generated so far (not only on how many there are)."""
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS or self.top_k == 1

    def verify(self, vocab_size: Optional[int] = None) -> None:
        def num(name: str, v: Any, kind=(int, float)) -> None:
            if isinstance(v, bool) or not isinstance(v, kind):
                raise SamplingParamsError(f"{name} must be a number, got {v!r}")
            if isinstance(v, float) and not math.isfinite(v):  # NaN passes every range check below
                raise SamplingParamsError(f"{name} must be a finite number, got {v!r}")

        num("temperature", self.temperature)
        num("top_p", self.top_p)
        num("top_k", self.top_k, int)
        num("min_p", self.min_p)
        num("frequency_penalty", self.frequency_penalty)
        num("presence_penalty", self.presence_penalty)
        num("repetition_penalty", self.repetition_penalty)
        if self.temperature < 0.0:
            raise SamplingParamsError(f"temperature must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingParamsError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise SamplingParamsError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.top_k < -1 or self.top_k == 0:
            raise SamplingParamsError(f"top_k must be -1 (disable), or at least 1, got {self.top_k}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise SamplingParamsError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise SamplingParamsError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise SamplingParamsError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}.")
        if self.max_new_tokens is not None:
            num("max_new_tokens", self.max_new_tokens, int)
            if self.max_new_tokens < 0:
                raise SamplingParamsError(f"max_new_tokens must be at least 0, got {self.max_new_tokens}.")
        num("min_new_tokens", self.min_new_tokens, int)
        if self.min_new_tokens < 0 or (
            self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens
        ):
            raise SamplingParamsError(
                f"min_new_tokens must be in [0, max_new_tokens({self.max_new_tokens})], got {self.min_new_tokens}."
            )
        parallel_sample_num({"n": self.n})
        if self.sampling_seed is not None:
            num("seed", self.sampling_seed, int)
        for name in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim",
                     "constrain_after_reasoning"):
            if not isinstance(getattr(self, name), bool):  # passed on to the tokenizer, which raises on a non-bool
                raise SamplingParamsError(f"{name} must be a boolean, got {getattr(self, name)!r}")
        if self.stop is not None and not isinstance(self.stop, (str, list)):
            raise SamplingParamsError("stop must be a string or a list of strings")
        if isinstance(self.stop, list) and not all(isinstance(s, str) for s in self.stop):
            raise SamplingParamsError("stop must be a string or a list of strings")
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids
            ):
                raise SamplingParamsError("stop_token_ids must be a list of integers")
            if vocab_size is not None and any(t < 0 or t >= vocab_size for t in self.stop_token_ids):
                raise SamplingParamsError(f"stop_token_ids must be in [0, {vocab_size})")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise SamplingParamsError("logit_bias must be an object of token id -> bias")
            for k, v in self.logit_bias.items():
                if isinstance(k, int) and not isinstance(k, bool):
                    tid = k
                elif isinstance(k, str) and _TOKEN_ID_KEY.fullmatch(k):
                    tid = int(k)
                else:  # (int() alone would also take " 5 ", "1_000" and other digits than ASCII ones)
                    raise SamplingParamsError(f"logit_bias key {k!r} is not a token id")
                num("logit_bias value", v)
                if not -LOGIT_BIAS_MAX <= v <= LOGIT_BIAS_MAX:  # OpenAI's range; 1e308 is inf in float32
                    raise SamplingParamsError(f"logit_bias values must be in [-100, 100], got {v} for {k!r}")
                if vocab_size is not None and not 0 <= tid < vocab_size:
                    raise SamplingParamsError(f"logit_bias token id {tid} is out of [0, {vocab_size})")

        self._verify_constraint()

    def _verify_constraint(self) -> None:
        given = [f for f in ("json_schema", "regex", "ebnf") if getattr(self, f) is not None]
        if len(given) > 1:
            raise SamplingParamsError(f"only one of json_schema, regex and ebnf may be given, got {given}")
        for f in given:
            spec = getattr(self, f)
            if not isinstance(spec, str) or not spec.strip():
                raise SamplingParamsError(f"{f} must be a non-empty string")
        if self.json_schema is not None:
            try:
                json.loads(self.json_schema)
            except ValueError as e:
                raise SamplingParamsError(f"json_schema is not valid JSON: {e}") from None

    @property
    def has_constraint(self) -> bool:
        return self.json_schema is not None or self.regex is not None or self.ebnf is not None

    def normalize(self) -> None:
        """Resolve derived fields; call after verify()."""
        if self.temperature < _GREEDY_EPS:
            # Greedy: keep the arithmetic well defined and make top_k=1 the canonical signal.
            self.temperature = 1.0
            self.top_k = 1
        if self.top_k == -1:
            self.top_k = TOP_K_ALL
        if self.stop is None:
            self.stop_strs = []
        elif isinstance(self.stop, str):
            self.stop_strs = [self.stop]
        else:
            self.stop_strs = list(self.stop)
        self.stop_strs = [s for s in self.stop_strs if s]
        self.stop_str_max_len = max((len(s) for s in self.stop_strs), default=0)


def parallel_sample_num(params: Any) -> int:
    """The `n` of a request's sampling-params dict, checked before the request is copied n times."""
    n = params.get("n", 1) if isinstance(params, dict) else 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_PARALLEL_SAMPLES:
        raise SamplingParamsError(f"n must be an integer in [1, {MAX_PARALLEL_SAMPLES}], got {n!r}.")
    return n
