"""Penalty state kept on the device across steps: each penalized request's output-token counts and prompt mask.

A frequency or presence penalty reads how often each token was generated so far, a repetition penalty also
which tokens the prompt holds. Rebuilding those [bs, vocab] tensors from every request's host lists each step
costs host time that grows with the output length, and needs the previous step's tokens on the host, so the
step cannot be formed before they arrive. Here each request has a row that is filled from its host ids once,
when a batch first samples for it, and then advanced on the device by `accumulate` with the ids just sampled
(SGLang's penalizers keep their counts on the device the same way).
"""

from __future__ import annotations

from itertools import chain
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch

ZERO_ROW = 0  # never handed out: the rows of a batch's unpenalized requests read it


class PenaltyCounts:
    """Rows of `counts` [rows, vocab] int32 and `prompt_mask` [rows, vocab] bool, one per live penalized request.

    Contract:
      * `rows(reqs, inflight_tokens)` gives each request of a batch its row (ZERO_ROW for a request without a
        penalty). A request seen for the first time gets a free row filled from its `output_ids` and
        `origin_input_ids`, which must then be complete on the host (`inflight_tokens == 0`, else ValueError).
      * `accumulate(rows, ids)` adds one sampled token per row, queued on the device: call it after every
        sampling whose token the request keeps.
      * A row is taken back once its request `finished()` (checked by `rows`). Work still queued for it (the
        overlap schedule's step that ran ahead) is ordered before the next owner's fill by the stream. With no
        row left in use the tensors shrink back to the zero row.
      * A retracted request keeps its row: its output ids do not change, so its counts stay true.
    """

    def __init__(self, vocab_size: int, device: torch.device, capacity: int = 1) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.counts = torch.zeros(max(capacity, 1), vocab_size, dtype=torch.int32, device=self.device)
        self.prompt_mask = torch.zeros(max(capacity, 1), vocab_size, dtype=torch.bool, device=self.device)
        self.owners: List[Any] = [None] * self.counts.shape[0]
        self.row_of: Dict[int, int] = {}  # id(request) -> row; the owner list keeps that request alive

    @property
    def rows_in_use(self) -> int:
        return len(self.row_of)

    @property
    def live_rows(self) -> int:
        """Rows whose request has not finished (rows_in_use also counts finished ones not yet taken back). An
        idle scheduler has none: one would be a request dropped without finishing, its row never freed."""
        return sum(not self.owners[row].finished() for row in self.row_of.values())

    def rows(self, reqs: Sequence[Any], inflight_tokens: int = 0) -> torch.Tensor:
        """[len(reqs)] int64 rows on the device (see the class docstring)."""
        self._release_finished()
        out, new = [], []
        for r in reqs:
            if not r.sampling_params.uses_penalties:
                out.append(ZERO_ROW)
                continue
            row = self.row_of.get(id(r))
            if row is None:
                if inflight_tokens:
                    raise ValueError(f"request {getattr(r, 'rid', '?')} needs penalty counts filled from its "
                                     "output ids, and the host does not have them all yet (inflight tokens)")
                row = self._take(r)
                new.append((row, r))
            out.append(row)
        if new:
            self._fill([row for row, _ in new], [r.output_ids for _, r in new], [r.origin_input_ids for _, r in new])
        return _to_device(out, self.device)

    def accumulate(self, rows: torch.Tensor, ids: torch.Tensor) -> None:
        """counts[rows[i], ids[i]] += 1 on the device (rows distinct, as in one batch, so no pair repeats)."""
        self.counts[rows, ids] += 1

    # ---------------------------------------------------------------- rows
    def _release_finished(self) -> None:
        for key, row in list(self.row_of.items()):
            if self.owners[row].finished():
                del self.row_of[key]
                self.owners[row] = None
        if not self.row_of and len(self.owners) > 1:
            # No penalized request left: give the rows' memory back (to torch's allocator) until the next one.
            self.counts, self.prompt_mask = self.counts[:1].clone(), self.prompt_mask[:1].clone()
            self.owners = [None]

    def _take(self, req: Any) -> int:
        free = next((i for i in range(1, len(self.owners)) if self.owners[i] is None), None)
        if free is None:
            free = len(self.owners)
            self._grow(2 * free)
        self.owners[free] = req
        self.row_of[id(req)] = free
        return free

    def _grow(self, capacity: int) -> None:
        extra = capacity - self.counts.shape[0]
        self.counts = torch.cat([self.counts, self.counts.new_zeros(extra, self.vocab_size)])
        self.prompt_mask = torch.cat([self.prompt_mask, self.prompt_mask.new_zeros(extra, self.vocab_size)])
        self.owners.extend([None] * extra)

    def _fill(self, rows: List[int], outputs: Sequence[Iterable[int]], prompts: Sequence[Iterable[int]]) -> None:
        """Set the rows from host ids in a few batched ops, whatever a previous owner left there."""
        index = _to_device(rows, self.device)
        self.counts.index_fill_(0, index, 0)
        self.prompt_mask.index_fill_(0, index, False)
        out_flat = flat_indices(outputs, self.vocab_size, rows).to(self.device, non_blocking=True)
        self.counts.view(-1).index_put_((out_flat,), torch.ones_like(out_flat, dtype=torch.int32), accumulate=True)
        prompt_flat = flat_indices(prompts, self.vocab_size, rows).to(self.device, non_blocking=True)
        self.prompt_mask.view(-1)[prompt_flat] = True


def flat_indices(rows: Sequence[Iterable[int]], vocab_size: int, row_numbers: Optional[Sequence[int]] = None
                 ) -> torch.Tensor:
    """CPU int64 indices `row_numbers[i] * vocab + id` (row_numbers defaults to 0, 1, ...) into a flattened
    [n, vocab] tensor, for every id of rows[i]; out-of-vocab ids dropped.

    Dropping (rather than trusting) out-of-range ids matters: one would otherwise land silently in the
    next row's slice of the flat tensor.
    """
    rows = [list(r) for r in rows]
    ids = torch.tensor(list(chain.from_iterable(rows)), dtype=torch.int64)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    numbers = torch.arange(len(rows), dtype=torch.int64) if row_numbers is None \
        else torch.tensor(list(row_numbers), dtype=torch.int64)
    row_idx = torch.repeat_interleave(numbers, lengths)
    valid = (ids >= 0) & (ids < vocab_size)
    return (row_idx * vocab_size + ids)[valid]


def _to_device(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)
