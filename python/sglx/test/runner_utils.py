"""Requests placed by hand in a ModelRunner's pools, for tests that drive the runner without a scheduler."""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from sglx.srt.model_executor.forward_batch import ForwardMode, ModelWorkerBatch


class PlacedRequests:
    """Rows and whole pages for each prompt plus `room` decode tokens (so decode slots are already in the
    row, as the paged allocator would place them); `prefill()` runs the prompts, `decode_batch(which)`
    advances the chosen requests by one token; `release()` gives the rows and slots back. `prompts`: these
    token ids instead of random ones of `prompt_lens`."""

    def __init__(self, runner, prompt_lens: Sequence[int], vocab_size: int, room: int = 64, seed: int = 0,
                 prompts: Optional[Sequence[Sequence[int]]] = None) -> None:
        self.runner = runner
        self.rows: List[int] = []
        self.lens: List[int] = []
        self.last_tokens: List[int] = []
        gen = torch.Generator().manual_seed(seed)
        ps = runner.page_size
        self.prompts: List[List[int]] = []
        self.slots: List[torch.Tensor] = []
        for k, n in enumerate(prompt_lens):
            row = runner.req_to_token_pool.alloc()
            slots = runner.token_to_kv_pool_allocator.alloc(-(-(n + room) // ps) * ps)
            runner.req_to_token_pool.write(row, 0, slots)
            self.rows.append(row)
            self.lens.append(n)
            self.slots.append(slots)
            self.prompts.append(list(prompts[k]) if prompts is not None
                                else torch.randint(0, vocab_size, (n,), generator=gen).tolist())

    def release(self) -> None:
        for row, slots in zip(self.rows, self.slots):
            self.runner.token_to_kv_pool_allocator.free(slots)
            self.runner.req_to_token_pool.free(row)
        self.rows, self.slots = [], []

    def prefill_batch(self) -> ModelWorkerBatch:
        ids = [t for p in self.prompts for t in p]
        locs = torch.cat([s[:n] for s, n in zip(self.slots, self.lens)])
        return ModelWorkerBatch(ForwardMode.EXTEND, ids, list(self.rows), list(self.lens), [0] * len(self.lens), locs)

    def prefill(self) -> torch.Tensor:
        logits = self.runner.forward(self.prefill_batch()).next_token_logits
        self.last_tokens = logits.argmax(-1).tolist()
        return logits

    def decode_batch(self, which: Sequence[int]) -> ModelWorkerBatch:
        r2t = self.runner.req_to_token_pool.req_to_token
        locs = []
        for i in which:
            locs.append(r2t[self.rows[i], self.lens[i]].long().reshape(1))
            self.lens[i] += 1
        return ModelWorkerBatch(ForwardMode.DECODE, [self.last_tokens[i] for i in which],
                                [self.rows[i] for i in which], [self.lens[i] for i in which],
                                [self.lens[i] - 1 for i in which], torch.cat(locs))
