"""POST /v1/completions.

Prompts may be a string, a list of strings, a list of token ids or a list of such lists; with n > 1 each
prompt is sampled n times and choice `p * n + j` is prompt p's j-th sample (OpenAI's order).
`max_tokens` defaults to 16 as in OpenAI's API; an explicit null means "up to the context".
`echo` with `logprobs` returns the prompt's tokens and logprobs first (the first token's logprob is null, as
OpenAI's), then the completion's: the prompt is scored from its first token (logprob_start_len 0), which is
what loglikelihood evaluations (lm-eval's completions API with max_tokens 0 or 1) read.
Not supported (400): `suffix`, `best_of` other than n.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from sglx.srt.entrypoints.openai.protocol import (
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionStreamChoice,
    CompletionStreamResponse,
    UsageInfo,
)
from sglx.srt.entrypoints.openai.serving_base import ChoiceState, GenPlan, OpenAIServingBase, Prompt
from sglx.srt.entrypoints.openai.utils import (
    TokenLogprob,
    echo_completion_logprobs,
    finish_reason_str,
    logprobs_since,
    matched_stop,
    prompt_logprobs,
    to_completion_logprobs,
)


def normalize_prompts(prompt: Any) -> List[Prompt]:
    """One list entry per prompt: a string or a list of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise ValueError("prompt must not be empty.")
    if isinstance(prompt[0], int):
        return [list(prompt)]
    if isinstance(prompt[0], list) and any(len(p) == 0 for p in prompt):
        raise ValueError("prompt must not contain an empty list of token ids.")
    return list(prompt)


class OpenAIServingCompletion(OpenAIServingBase):
    request_cls = CompletionRequest
    id_prefix = "cmpl-"

    def build_plan(self, req: CompletionRequest) -> GenPlan:
        if req.suffix:
            raise ValueError("suffix is not supported.")
        if req.best_of is not None and req.best_of != req.num_choices:
            raise ValueError("best_of is not supported (only best_of equal to n).")
        prompts = normalize_prompts(req.prompt)
        sampling = self.sampling_params(req, req.max_tokens)
        return self.make_plan(
            req,
            prompts,
            sampling,
            return_logprob=req.logprobs is not None,
            top_logprobs_num=req.logprobs or 0,
            logprob_start_len=0 if req.echo and req.logprobs is not None else -1,
        )

    def _echo_text(self, req: CompletionRequest, plan: GenPlan, index: int) -> str:
        if not req.echo:
            return ""
        prompt = plan.prompts[index // plan.choices_per_prompt]
        if isinstance(prompt, str):
            return prompt
        tokenizer = self.tokenizer_manager.tokenizer
        if tokenizer is None:
            raise ValueError("echo of a token-id prompt needs a tokenizer; the server runs without one.")
        return tokenizer.decode(prompt)

    def _logprobs(self, req: CompletionRequest, meta: Dict[str, Any], output: List[TokenLogprob],
                  text_offset: int, first: bool) -> CompletionLogProbs:
        """The output's logprobs; with echo, the first chunk (or the whole response) leads with the prompt's."""
        if req.echo and first:
            prompt = prompt_logprobs(meta, self.tokenizer_manager.tokenizer)
            return echo_completion_logprobs(prompt, output, text_offset)
        return to_completion_logprobs(output, text_offset)

    # ------------------------------------------------------------------ non-streaming
    def build_response(self, req: CompletionRequest, plan: GenPlan, outputs: List[Dict[str, Any]]) -> CompletionResponse:
        choices = []
        for i, out in enumerate(outputs):
            meta = out.get("meta_info", {})
            prefix = self._echo_text(req, plan, i)
            logprobs = None
            if plan.want_logprobs:
                logprobs = self._logprobs(req, meta, logprobs_since(meta, 0, self.tokenizer_manager.tokenizer),
                                          len(prefix), first=True)
            fr = meta.get("finish_reason")
            choices.append(
                CompletionResponseChoice(
                    index=i,
                    text=prefix + out.get("text", ""),
                    logprobs=logprobs,
                    finish_reason=finish_reason_str(fr),
                    matched_stop=matched_stop(fr),
                )
            )
        return CompletionResponse(
            id=plan.response_id,
            created=plan.created,
            model=plan.model,
            choices=choices,
            usage=self.usage(plan, [o.get("meta_info", {}) for o in outputs]),
        )

    # ------------------------------------------------------------------ streaming
    def build_chunk(
        self,
        req: CompletionRequest,
        plan: GenPlan,
        index: int,
        state: ChoiceState,
        delta: str,
        logprobs: List[TokenLogprob],
        finish_reason: Optional[Dict[str, Any]],
    ) -> CompletionStreamResponse:
        if not state.started:
            # The echoed prompt goes out with the choice's first chunk.
            prefix = self._echo_text(req, plan, index)
            delta = prefix + delta
            state.text_offset = len(prefix)
        lp = None
        if plan.want_logprobs:
            lp = self._logprobs(req, state.meta, logprobs, state.text_offset, first=not state.started)
            state.text_offset += sum(len(e.text) for e in logprobs)
        choice = CompletionStreamChoice(
            index=index,
            text=delta,
            logprobs=lp,
            finish_reason=finish_reason_str(finish_reason),
            matched_stop=matched_stop(finish_reason),
        )
        return CompletionStreamResponse(
            id=plan.response_id, created=plan.created, model=plan.model, choices=[choice]
        )

    def build_usage_chunk(self, plan: GenPlan, usage: UsageInfo) -> CompletionStreamResponse:
        return CompletionStreamResponse(
            id=plan.response_id, created=plan.created, model=plan.model, choices=[], usage=usage
        )
