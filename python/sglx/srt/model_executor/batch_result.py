"""What a launched step hands back to the scheduler: device results on their way to the host.

A step's outputs are copied to the host without waiting (into pinned memory behind a CUDA event on a GPU),
so the scheduler can launch the next step first and ask for this one's results later (the overlap schedule,
managers/scheduler.py); `host()` blocks on this step's event only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Union

import torch

from sglx.srt.layers.logits_processor import LogitsProcessorOutput
from sglx.srt.layers.sampler import SamplerOutput, top_logprobs_to_lists


@dataclass
class HostSamplerOutput:
    """A step's sampled tokens (and the logprobs asked for) as python lists, for the scheduler."""

    next_token_ids: List[int]
    next_token_logprobs: Optional[List[float]] = None
    top_logprobs_val: Optional[List[List[float]]] = None
    top_logprobs_idx: Optional[List[List[int]]] = None
    # Prompt logprobs of an extend (ScheduleBatch.input_logprob_* says whose): one value per scored position,
    # and its top alternatives (the batch's largest k; each request keeps its own first top_logprobs_num).
    input_token_logprobs: Optional[List[float]] = None
    input_top_logprobs_val: Optional[List[List[float]]] = None
    input_top_logprobs_idx: Optional[List[List[int]]] = None


class HostCopy:
    """Device tensors copied to the host without waiting: into pinned memory behind a CUDA event on a GPU
    (plain copies elsewhere); `wait()` blocks on that event only and returns the host tensors."""

    def __init__(self, tensors: List[Optional[torch.Tensor]]) -> None:
        on_gpu = any(t is not None and t.is_cuda for t in tensors)
        self.tensors = [t.to("cpu", non_blocking=on_gpu) if t is not None else None for t in tensors]
        self.done: Optional[torch.cuda.Event] = None
        if on_gpu:
            self.done = torch.cuda.Event()
            self.done.record()

    def wait(self) -> List[Optional[torch.Tensor]]:
        if self.done is not None:
            self.done.synchronize()
            self.done = None
        return self.tensors


@dataclass
class EmbeddingBatchResult:
    """One launched embedding step: its pooled vectors on their way to the host (see HostCopy)."""

    embeddings: HostCopy

    def host(self) -> torch.Tensor:
        """[n, dim] float32 on the host; blocks until this step is done."""
        return self.embeddings.wait()[0]


@dataclass
class GenerationBatchResult:
    """One launched step. Its device tensors are copied to the host asynchronously, right after sampling
    (into pinned memory on a GPU, with an event behind the copies); `host()` waits for that event only, so
    the scheduler can launch the next step before it asks for this one's tokens (the overlap schedule)."""

    logits_output: LogitsProcessorOutput
    sampler_output: Optional[SamplerOutput]
    top_logprobs_nums: Optional[List[int]] = None
    _copy: Optional[HostCopy] = None
    _host: Optional[HostSamplerOutput] = None

    def start_host_copy(self) -> None:
        out, lo = self.sampler_output, self.logits_output
        self._copy = HostCopy([out.next_token_ids, out.next_token_logprobs, out.top_logprobs_val,
                               out.top_logprobs_idx, lo.input_token_logprobs, lo.input_top_logprobs_val,
                               lo.input_top_logprobs_idx])

    def host(self) -> HostSamplerOutput:
        """The sampled tokens on the host; blocks until this step's copies (and so the step) are done."""
        if self._host is None:
            ids, logprobs, top_val, top_idx, in_lp, in_top_val, in_top_idx = (
                t.tolist() if t is not None else None for t in self._copy.wait())
            self._host = HostSamplerOutput(ids, logprobs, input_token_logprobs=in_lp,
                                           input_top_logprobs_val=in_top_val, input_top_logprobs_idx=in_top_idx)
            if top_val is not None:
                self._host.top_logprobs_val, self._host.top_logprobs_idx = top_logprobs_to_lists(
                    top_val, top_idx, self.top_logprobs_nums)
        return self._host


# What Scheduler.launch_batch hands back: a generation or an embedding step.
BatchResult = Union[GenerationBatchResult, EmbeddingBatchResult]
