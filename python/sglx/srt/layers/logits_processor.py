"""From final hidden states to next-token logits (last position of each request), and the prompt logprobs that
requests ask for (return_logprob with logprob_start_len >= 0)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Tuple

import torch
from torch import nn

if TYPE_CHECKING:
    from sglx.srt.model_executor.forward_batch import ForwardBatch

# Prompt logprobs need a full row of logits per scored position: they are computed this many logits at a time
# (64 MiB of float32), so a long prompt never holds [tokens, vocab] at once.
INPUT_LOGPROB_CHUNK_ELEMENTS = 1 << 24


@dataclass
class LogitsProcessorOutput:
    next_token_logits: torch.Tensor  # [bs, vocab] float32
    hidden_states: Optional[torch.Tensor] = None  # [bs, hidden] last-position hidden states (for embeddings/tests)
    # Prompt logprobs, one row per entry of ForwardBatch.input_logprob_indices: the log_softmax of the logits at
    # that position, at the next prompt token [m]; and its top input_top_logprobs_num values and ids [m, k].
    input_token_logprobs: Optional[torch.Tensor] = None
    input_top_logprobs_val: Optional[torch.Tensor] = None
    input_top_logprobs_idx: Optional[torch.Tensor] = None


class LogitsProcessor(nn.Module):
    def __init__(self, vocab_size: int, logit_scale: float = 1.0, final_logit_softcapping: float = 0.0) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.logit_scale = logit_scale
        self.softcap = final_logit_softcapping

    def forward(self, hidden_states: torch.Tensor, lm_head_weight: torch.Tensor, fb: "ForwardBatch") -> LogitsProcessorOutput:
        fb.check_out_rows(hidden_states)
        if fb.forward_mode.is_decode() or fb.out_rows is not None:
            last = hidden_states  # one row per request already (the model kept only ForwardBatch.out_rows)
        else:
            last = hidden_states[fb.last_token_rows()]
        out = LogitsProcessorOutput(next_token_logits=self.logits(last, lm_head_weight), hidden_states=last)
        if fb.input_logprob_indices is not None and not fb.forward_mode.is_decode():
            out.input_token_logprobs, out.input_top_logprobs_val, out.input_top_logprobs_idx = \
                self.input_logprobs(hidden_states, lm_head_weight, fb)
        return out

    def logits(self, hidden: torch.Tensor, lm_head_weight: torch.Tensor) -> torch.Tensor:
        logits = torch.matmul(hidden, lm_head_weight.t()).float()[:, : self.vocab_size]
        if self.logit_scale != 1.0:
            logits.mul_(self.logit_scale)
        if self.softcap > 0:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits

    def input_logprobs(
        self, hidden_states: torch.Tensor, lm_head_weight: torch.Tensor, fb: "ForwardBatch"
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Raw log_softmax (as for output logprobs) at the scored positions, a chunk of rows at a time."""
        idx, targets, k = fb.input_logprob_indices, fb.input_logprob_targets, fb.input_top_logprobs_num
        rows = max(1, INPUT_LOGPROB_CHUNK_ELEMENTS // self.vocab_size)
        chosen, top_val, top_idx = [], [], []
        for s in range(0, idx.shape[0], rows):
            logprobs = torch.log_softmax(self.logits(hidden_states[idx[s : s + rows]], lm_head_weight), dim=-1)
            chosen.append(logprobs.gather(1, targets[s : s + rows, None]).squeeze(1))
            if k > 0:
                val, ids = logprobs.topk(k, dim=-1)
                top_val.append(val)
                top_idx.append(ids)
        if k == 0:
            return torch.cat(chosen), None, None
        return torch.cat(chosen), torch.cat(top_val), torch.cat(top_idx)
