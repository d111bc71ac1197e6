"""RoPE scaling (llama3, linear, YaRN) against transformers' own rope initialisation.

The cos/sin cache of `get_rope` must equal cos/sin of transformers' inverse frequencies times its attention
factor, at every position, for the configs each scaling type is found with (Llama 3.1, Qwen3 with YaRN, DeepSeek's
mscale pair, partial rotary). The whole-model check of a YaRN Qwen3 is in test_model_families.py.
"""

from __future__ import annotations

import pytest
import torch

from sglx.srt.layers.rotary_embedding import get_rope

CASES = {
    "llama3": (8192, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}, 1.0),
    "linear": (4096, {"rope_type": "linear", "factor": 2.0}, 1.0),
    "yarn-qwen3": (40960, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, 1.0),
    "yarn-no-original": (8192, {"rope_type": "yarn", "factor": 4.0}, 1.0),
    "yarn-betas-untruncated": (16384, {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 2048,
                                       "beta_fast": 16, "beta_slow": 2, "truncate": False}, 1.0),
    "yarn-mscale-pair": (16384, {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                                 "mscale": 1.0, "mscale_all_dim": 0.707}, 1.0),
    "yarn-attention-factor": (4096, {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 2048,
                                     "attention_factor": 1.3}, 1.0),
    "yarn-partial": (8192, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}, 0.5),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cos_sin_cache_matches_transformers(case):
    import transformers as tf
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    max_pos, params, partial = CASES[case]
    head_dim, theta = 128, 500000.0
    cfg = tf.Qwen3Config(hidden_size=512, num_attention_heads=4, head_dim=head_dim, max_position_embeddings=max_pos,
                         rope_parameters={**params, "rope_theta": theta}, partial_rotary_factor=partial)
    inv_freq, attention = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, "cpu")
    if params["rope_type"] == "yarn":
        assert attention != 1.0 or case == "yarn-mscale-pair"  # the factor is under test too
    positions = torch.arange(max_pos, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq.float())
    want = torch.cat([freqs.cos(), freqs.sin()], dim=-1) * attention

    rope = get_rope(cfg, head_dim, max_pos)
    assert rope.rotary_dim == int(head_dim * partial)
    # (fp32 angles: an inverse frequency 1e-8 apart is 4e-5 apart at position 4096)
    torch.testing.assert_close(rope.cos_sin_cache, want, rtol=0, atol=1e-4)


def test_unknown_scaling_is_refused():
    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=256,
                         rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(NotImplementedError, match="dynamic"):
        get_rope(cfg, 16, 256)
