"""Structured output: grammars that constrain what a request may generate (SGLang's `constrained/` package).

A request's constraint is one of `json_schema`, `regex` or `ebnf` (its sampling params). A grammar backend,
chosen by name (`--grammar-backend`), compiles it once per distinct spec; each request then gets its own
grammar object, which tracks what the request generated so far. Every step the scheduler asks the objects
of the batch for the tokens allowed next, as a bitmask over the vocabulary (int32 words, bit j of word w
set = token 32 * w + j allowed); the sampler sets the other logits to -inf, and the sampled token goes back
to the object with `accept_token`. Once a grammar is complete and its stop token accepted, it is
terminated and the request finishes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch

# ("json" | "regex" | "ebnf", the spec as the request gave it): what a compiled grammar is cached under.
GrammarKey = Tuple[str, str]


class GrammarError(ValueError):
    """A constraint that cannot be compiled (bad schema, regex or grammar): the request gets a 400."""


class BaseGrammarObject(ABC):
    """One request's grammar state. Not thread-safe; only the scheduler's thread uses it once compiled."""

    @abstractmethod
    def copy(self) -> "BaseGrammarObject":
        """A fresh object over the same compiled grammar, at its start (one per request)."""

    @abstractmethod
    def fill_vocab_mask(self, mask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into `mask[row]` (a CPU int32 bitmask row); changes no state."""

    @abstractmethod
    def accept_token(self, token: int) -> bool:
        """Advance by one generated token; False (state unchanged) when the grammar does not allow it."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """The grammar is complete and has accepted a stop token: nothing more may be generated."""

    def gate_token(self) -> Optional[int]:
        """A token T such that, whatever the last token was, the next mask is `fill_vocab_mask`'s unless the
        last token is T, and then `fill_gated_mask`'s. Such a grammar needs no last token on the host: the
        overlap schedule's step that runs ahead picks between the two masks on the device. None (the default):
        the next mask depends on every token, so it needs them all on the host."""
        return None

    def fill_gated_mask(self, mask: torch.Tensor, row: int) -> None:
        """The mask that holds after `gate_token()` is accepted (only called while that is not None)."""
        raise NotImplementedError


class BaseGrammarBackend(ABC):
    """Compiles constraints for one tokenizer and vocabulary (`vocab_size`, the model's: the masks' width).
    `compile` runs on the grammar manager's worker thread, never on the scheduler's; it raises GrammarError for
    a spec it cannot compile."""

    vocab_size: int

    @abstractmethod
    def compile(self, key: GrammarKey) -> BaseGrammarObject:
        """The grammar of `key`, at its start (requests take `.copy()`s of it)."""


# name -> factory(tokenizer, vocab_size, stop_token_ids, server_args)
GRAMMAR_BACKENDS: Dict[str, Callable[..., BaseGrammarBackend]] = {}


def register_grammar_backend(name: str):
    def deco(factory: Callable[..., BaseGrammarBackend]):
        GRAMMAR_BACKENDS[name] = factory
        return factory

    return deco


def _load_builtin() -> None:
    from sglx.srt.constrained import xgrammar_backend  # noqa: F401  (imports xgrammar lazily, in its factory)


def grammar_backend_names() -> list:
    _load_builtin()
    return sorted(GRAMMAR_BACKENDS) + ["none"]


def create_grammar_backend(name: str, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int],
                           server_args: Any = None) -> Optional[BaseGrammarBackend]:
    """The backend called `name`, or None for "none" (structured output refused)."""
    if name == "none":
        return None
    if name not in grammar_backend_names():
        raise ValueError(f"unknown grammar backend {name!r}; available: {grammar_backend_names()}")
    return GRAMMAR_BACKENDS[name](tokenizer, vocab_size, sorted(stop_token_ids), server_args)


def grammar_key(sampling_params: Any) -> Optional[GrammarKey]:
    """The constraint a request's sampling params ask for (SamplingParams.verify allows at most one)."""
    for kind, field in (("json", "json_schema"), ("regex", "regex"), ("ebnf", "ebnf")):
        spec = getattr(sampling_params, field, None)
        if spec is not None:
            return kind, spec
    return None


# ----------------------------------------------------------------------------- vocab masks
def allocate_vocab_mask(rows: int, vocab_size: int) -> torch.Tensor:
    """A CPU int32 bitmask [rows, ceil(vocab / 32)] with every token allowed."""
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def apply_vocab_mask(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`logits` [n, vocab] with the tokens `mask` [n, ceil(vocab / 32)] does not allow set to -inf (a new
    tensor; the bits are unpacked on the logits' device)."""
    bits = torch.arange(32, dtype=torch.int32, device=mask.device)
    allowed = ((mask.unsqueeze(-1) >> bits) & 1).view(mask.shape[0], -1)[:, : logits.shape[-1]]
    return logits.masked_fill(allowed == 0, float("-inf"))
