"""CudaGraphRunner's static buffers, padding and backend hooks, on CPU.

The graph handle is EagerGraph (replay re-runs the captured function on the same static buffers) and the
backend is `triton` under Triton's interpreter, whose capture/replay hooks are the ones a GPU uses. A replayed
decode step must give the eager forward's logits for batch sizes that need padding and ones that don't, and
it must write no KV slot but the batch's own and the reserved padding slot 0.
"""

from __future__ import annotations

from sglx.test.triton_interpreter import use_triton_interpreter

use_triton_interpreter("sglx.srt.layers.attention.triton_ops.extend_attention", "_extend_kernel")

import dataclasses  # noqa: E402
import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from sglx.srt.configs.model_config import ModelConfig  # noqa: E402
from sglx.srt.model_executor.cuda_graph_runner import CudaGraphRunner, EagerGraph, capture_batch_sizes  # noqa: E402
from sglx.srt.model_executor.model_runner import ModelRunner  # noqa: E402
from sglx.srt.server_args import ServerArgs, default_model_path  # noqa: E402
from sglx.test.runner_utils import PlacedRequests  # noqa: E402

TINY = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 300,
    "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "torch_dtype": "float32",
}


def test_capture_batch_sizes():
    assert capture_batch_sizes(1) == [1]
    assert capture_batch_sizes(8) == [1, 2, 4, 8]
    assert capture_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_batch_sizes(256)[-3:] == [240, 248, 256]


@pytest.mark.parametrize("page_size", [1, 4])
def test_replay_matches_eager_and_padding_writes_only_slot_zero(tmp_path, page_size):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    sa = ServerArgs(model_path=str(tmp_path), tokenizer_path=default_model_path(), load_format="dummy", device="cpu",
                    attention_backend="triton", page_size=page_size, max_total_tokens=1024, cuda_graph_max_bs=8)
    runner = ModelRunner(ModelConfig.from_path(str(tmp_path), dtype="float32"), sa)
    graphs = CudaGraphRunner(runner, graph_factory=EagerGraph)
    assert sorted(graphs.graphs) == [1, 2, 4, 8]
    reqs = PlacedRequests(runner, [5, 17, 9, 33, 2, 12], TINY["vocab_size"], room=16)
    reqs.prefill()
    pool = runner.token_to_kv_pool
    for which in ([0], [1, 2, 3], [0, 1, 2, 3, 4], list(range(6)), [5, 3]):
        batch = reqs.decode_batch(which)
        assert graphs.can_run(batch)
        before = [b.clone() for b in pool.k_buffer]
        want = runner.forward(batch)  # eager: on CPU the runner itself never routes to a graph runner
        want_logits = want.next_token_logits.clone()
        written = set(batch.out_cache_loc.tolist())
        for layer, (b0, b1) in enumerate(zip(before, pool.k_buffer)):
            changed = set((b0 != b1).flatten(1).any(1).nonzero().flatten().tolist())
            assert changed <= written, f"eager step wrote outside its slots (layer {layer})"
        snap = [b.clone() for b in pool.k_buffer]
        got = graphs.replay(batch)
        assert got.next_token_logits.shape == want_logits.shape
        torch.testing.assert_close(got.next_token_logits, want_logits, rtol=1e-4, atol=1e-4)
        for layer, (b0, b1) in enumerate(zip(snap, pool.k_buffer)):
            changed = set((b0 != b1).flatten(1).any(1).nonzero().flatten().tolist())
            assert changed <= written | {0}, f"replay wrote a live slot outside the batch (layer {layer})"
        # The scheduler leaves a decode step's input ids to the device (input_ids None): the runner reads each
        # row's newest token from last_token_ids, in the graph and eagerly. Rewriting the same KV is idempotent.
        runner.last_token_ids.zero_()
        runner.last_token_ids[torch.tensor(batch.req_pool_indices)] = torch.tensor(batch.input_ids)
        on_device = dataclasses.replace(batch, input_ids=None)
        torch.testing.assert_close(graphs.replay(on_device).next_token_logits, want_logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(runner.forward(on_device).next_token_logits, want_logits, rtol=0, atol=0)
        for i, t in zip(which, got.next_token_logits.argmax(-1).tolist()):
            reqs.last_tokens[i] = t
    assert runner.cuda_graph_runner is None  # CPU: the runner itself never builds one
