"""The xgrammar grammar backend (SGLang's default): JSON schemas, regular expressions and EBNF grammars
compiled against the tokenizer's vocabulary, with a token bitmask per step from a GrammarMatcher."""

from __future__ import annotations

from typing import Any, List

import torch

from sglx.srt.constrained.base_grammar_backend import (
    BaseGrammarBackend,
    BaseGrammarObject,
    GrammarError,
    GrammarKey,
    register_grammar_backend,
)


class XGrammarObject(BaseGrammarObject):
    def __init__(self, compiled: Any) -> None:
        import xgrammar

        self.compiled = compiled
        self.matcher = xgrammar.GrammarMatcher(compiled)

    def copy(self) -> "XGrammarObject":
        return XGrammarObject(self.compiled)

    def fill_vocab_mask(self, mask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(mask, row)

    def accept_token(self, token: int) -> bool:
        return self.matcher.accept_token(token)

    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()


class XGrammarBackend(BaseGrammarBackend):
    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: List[int], any_whitespace: bool = True
                 ) -> None:
        try:
            import xgrammar
        except ImportError as e:
            raise GrammarError("structured output needs the xgrammar package (pip install xgrammar)") from e
        # vocab_size is the model's (its logits' width): ids past the tokenizer's own are never allowed.
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=stop_token_ids or None)
        self.compiler = xgrammar.GrammarCompiler(info)
        self.vocab_size = vocab_size
        self.any_whitespace = any_whitespace

    def compile(self, key: GrammarKey) -> XGrammarObject:
        kind, spec = key
        try:
            if kind == "json":
                compiled = self.compiler.compile_json_schema(spec, any_whitespace=self.any_whitespace)
            elif kind == "regex":
                compiled = self.compiler.compile_regex(spec)
            elif kind == "ebnf":
                compiled = self.compiler.compile_grammar(spec)
            else:
                raise GrammarError(f"unknown constraint kind {kind!r}")
        except RuntimeError as e:  # xgrammar reports bad specs as RuntimeError, with its C++ location first
            raise GrammarError(f"invalid {kind} constraint: {_message(e)}") from None
        return XGrammarObject(compiled)


def _message(e: Exception) -> str:
    text = str(e).strip()
    # "[hh:mm:ss] /project/cpp/file.cc:123: message" -> "message"
    if text.startswith("[") and ": " in text:
        text = text.split(": ", 1)[1] if ".cc:" in text.split(": ", 1)[0] else text
    return text


@register_grammar_backend("xgrammar")
def _make(tokenizer: Any, vocab_size: int, stop_token_ids: List[int], server_args: Any = None) -> XGrammarBackend:
    any_ws = not getattr(server_args, "constrained_json_disable_any_whitespace", False)
    return XGrammarBackend(tokenizer, vocab_size, stop_token_ids, any_whitespace=any_ws)
