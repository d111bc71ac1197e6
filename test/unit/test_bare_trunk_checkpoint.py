"""A Qwen3-Embedding-style checkpoint: transformers' bare Qwen3Model tensors (no "model." prefix, no lm_head)
under a config that names Qwen3ForCausalLM, with sentence-transformers files asking for last-token pooling.
sglx must serve it as an embedder equal to transformers' Qwen3Model (CPU, fp32), and refuse to generate with it
(its lm_head would be random) unless the head is tied to the embedding."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from sglx.srt.configs.model_config import ModelConfig
from sglx.srt.layers.pooler import PoolingConfig, PoolingType
from sglx.srt.model_executor.model_runner import ModelRunner
from sglx.srt.server_args import ServerArgs
from test.unit.test_embedding_model import embed, make_runner

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0)
SEQS = [[5, 17, 99, 3], [200, 8, 8, 8, 8, 1, 2, 3, 4, 5, 6], [42]]
ST_FILES = {
    "modules.json": [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                     {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                     {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}],
    "1_Pooling/config.json": {"word_embedding_dimension": 64, "pooling_mode_cls_token": False,
                              "pooling_mode_mean_tokens": False, "pooling_mode_lasttoken": True, "include_prompt": True},
}


def _save_trunk(tmp_path, tied: bool):
    torch.manual_seed(0)
    trunk = transformers.Qwen3Model(transformers.Qwen3Config(**TINY, tie_word_embeddings=tied)).eval()
    trunk.save_pretrained(tmp_path, safe_serialization=True)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["architectures"] = ["Qwen3ForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(conf))
    for name, body in ST_FILES.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(json.dumps(body))
    return str(tmp_path), trunk


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("skip", [True, False])
def test_bare_trunk_serves_embeddings_like_transformers(tmp_path, tied, skip):
    path, trunk = _save_trunk(tmp_path, tied)
    runner = make_runner(path, skip, dtype="float32")
    assert runner.pooler.config == PoolingConfig(PoolingType.LAST, normalize=True)
    assert runner.model.can_generate is tied
    with torch.no_grad():
        want = torch.stack([trunk(input_ids=torch.tensor([s])).last_hidden_state[0, -1] for s in SEQS])
    torch.testing.assert_close(embed(runner, SEQS), F.normalize(want, dim=-1), atol=1e-5, rtol=1e-5)


def test_bare_trunk_without_lm_head_refuses_to_generate(tmp_path):
    path, _ = _save_trunk(tmp_path, tied=False)
    with pytest.raises(ValueError, match="has no lm_head .* serve it with --is-embedding"):
        ModelRunner(ModelConfig.from_path(path), ServerArgs(model_path=path, device="cpu", max_total_tokens=1024))


def test_bare_trunk_with_tied_head_still_generates(tmp_path):
    path, trunk = _save_trunk(tmp_path, tied=True)
    runner = ModelRunner(ModelConfig.from_path(path, dtype="float32"),
                         ServerArgs(model_path=path, device="cpu", max_total_tokens=1024, dtype="float32"))
    assert torch.equal(runner.model.lm_head_weight, trunk.embed_tokens.weight)
