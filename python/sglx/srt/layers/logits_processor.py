"""From final hidden states to next-token logits (last position of each request only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

if TYPE_CHECKING:
    from sglx.srt.model_executor.forward_batch import ForwardBatch


@dataclass
class LogitsProcessorOutput:
    next_token_logits: torch.Tensor  # [bs, vocab] float32
    hidden_states: Optional[torch.Tensor] = None  # [bs, hidden] last-position hidden states (for embeddings/tests)


class LogitsProcessor(nn.Module):
    def __init__(self, vocab_size: int, logit_scale: float = 1.0, final_logit_softcapping: float = 0.0) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.logit_scale = logit_scale
        self.softcap = final_logit_softcapping

    def forward(self, hidden_states: torch.Tensor, lm_head_weight: torch.Tensor, fb: "ForwardBatch") -> LogitsProcessorOutput:
        if fb.forward_mode.is_decode():
            last = hidden_states
        else:
            last = hidden_states[fb.extend_start_loc + fb.extend_seq_lens - 1]
        logits = torch.matmul(last, lm_head_weight.t()).float()[:, : self.vocab_size]
        if self.logit_scale != 1.0:
            logits.mul_(self.logit_scale)
        if self.softcap > 0:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return LogitsProcessorOutput(next_token_logits=logits, hidden_states=last)
