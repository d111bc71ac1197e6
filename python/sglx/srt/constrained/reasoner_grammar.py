"""A constraint that holds only for the answer of a reasoning model (SGLang's reasoner grammar).

A thinking model writes its reasoning first (`<think> ... </think>` for Qwen3 and DeepSeek-R1) and its answer
after it. A JSON schema, regex or grammar describes the answer, so applying it from the first token would
forbid the thinking (the constraint's first token is never `<think>`). With `--reasoning-parser`, a request
whose `constrain_after_reasoning` is set gets its grammar wrapped in this object: every token is allowed
until the reasoning's end token has been generated, and the grammar constrains what follows.
"""

from __future__ import annotations

from typing import Optional

import torch

from sglx.srt.constrained.base_grammar_backend import BaseGrammarObject


class ReasonerGrammarObject(BaseGrammarObject):
    """`inner` (a request's own grammar, at its start) gated by the reasoning's tags, each one token.

    * `start_token_id` None (DeepSeek-R1: the prompt opened the reasoning): the output starts inside it.
    * Else (Qwen3: the model opens it, or answers at once): the first token may be the start tag, which
      opens the reasoning, or any token the grammar allows, which begins the answer. So a model that does not
      think is still constrained from its first token, not left free while waiting for an end tag.

    Inside the reasoning every token is allowed; the end tag closes it and the grammar holds from then on. An
    output that never closes it is never constrained (it is all reasoning).
    """

    def __init__(self, inner: BaseGrammarObject, end_token_id: int, start_token_id: Optional[int] = None) -> None:
        self.inner = inner
        self.end_token_id = end_token_id
        self.start_token_id = start_token_id
        self.state = "reasoning" if start_token_id is None else "start"  # -> "reasoning" -> "answer"

    def copy(self) -> "ReasonerGrammarObject":
        return ReasonerGrammarObject(self.inner.copy(), self.end_token_id, self.start_token_id)

    def fill_vocab_mask(self, mask: torch.Tensor, row: int) -> None:
        if self.state == "reasoning":
            mask[row].fill_(-1)  # every bit set: any token
            return
        self.inner.fill_vocab_mask(mask, row)
        if self.state == "start":
            word, bit = divmod(self.start_token_id, 32)
            value = (int(mask[row, word]) & 0xFFFFFFFF) | (1 << bit)
            mask[row, word] = value - (1 << 32) if value >= 1 << 31 else value  # as a signed int32

    def gate_token(self) -> Optional[int]:
        # Inside the reasoning any token may follow, unless the last one closed it: then the grammar's first
        # mask (it has not moved yet). So a thinking request's steps need not wait for its tokens on the host.
        return self.end_token_id if self.state == "reasoning" else None

    def fill_gated_mask(self, mask: torch.Tensor, row: int) -> None:
        self.inner.fill_vocab_mask(mask, row)

    def accept_token(self, token: int) -> bool:
        if self.state == "start":
            if token == self.start_token_id:
                self.state = "reasoning"
                return True
            accepted = self.inner.accept_token(token)
            if accepted:  # (refused: the state stays as it was, as the contract says)
                self.state = "answer"
            return accepted
        if self.state == "reasoning":
            if token == self.end_token_id:
                self.state = "answer"
            return True
        return self.inner.accept_token(token)

    def is_terminated(self) -> bool:
        return self.state == "answer" and self.inner.is_terminated()
