"""RoBERTa-family encoders (RobertaModel, XLMRobertaModel) served as embedders, against transformers (CPU, fp32).

Tiny random checkpoints written by transformers itself; sglx's pooled vectors must equal transformers'
last_hidden_state pooled by hand, on the skip-KV path and the KV-cache path. One input holds the pad token in
its middle, where RoBERTa's position ids stop counting (the case that a plain `positions + 2` gets wrong)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from sglx.srt.configs.model_config import ModelConfig
from sglx.srt.layers.pooler import PoolingConfig, PoolingType
from test.unit.test_embedding_model import embed, make_runner

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=300, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
            max_position_embeddings=66, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
            hidden_act="gelu")
PAD = TINY["pad_token_id"]
SEQS = [[0, 17, 45, 99, 2], [0, 250, 3, 2], [0] + list(range(5, 60)) + [2], [0, 33, PAD, 71, 80, 2], [0, 2]]


def _save(tmp_path, arch: str, masked_lm: bool = False):
    """A random tiny checkpoint of `arch` (or its *ForMaskedLM, whose tensors carry the "roberta." prefix)
    whose config names `arch`, and transformers' base model holding the same weights."""
    torch.manual_seed(0)
    cfg_cls = getattr(transformers, arch.replace("Model", "Config"))
    cfg = cfg_cls(**TINY)
    model = getattr(transformers, arch.replace("Model", "ForMaskedLM") if masked_lm else arch)(cfg).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["architectures"] = [arch]  # served as the encoder whatever head the checkpoint came with
    (tmp_path / "config.json").write_text(json.dumps(conf))
    return str(tmp_path), (model.roberta if masked_lm else model)


def _reference(model, seqs, pooling: PoolingType) -> torch.Tensor:
    outs = []
    with torch.no_grad():
        for s in seqs:
            h = model(input_ids=torch.tensor([s]), attention_mask=torch.ones(1, len(s), dtype=torch.long))
            h = h.last_hidden_state[0]
            outs.append(h.mean(0) if pooling == PoolingType.MEAN else h[0])
    return F.normalize(torch.stack(outs), dim=-1)


@pytest.mark.parametrize("arch", ["RobertaModel", "XLMRobertaModel"])
@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("pooling", [PoolingType.MEAN, PoolingType.CLS])
def test_matches_transformers(tmp_path, arch, skip, pooling):
    path, model = _save(tmp_path, arch)
    runner = make_runner(path, skip, pooling=pooling.value, dtype="float32")
    assert runner.skip_kv_cache is skip
    assert runner.pooler.config == PoolingConfig(pooling, normalize=True)
    got = embed(runner, SEQS)
    want = _reference(model, SEQS, pooling)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_positions_skip_pads_like_transformers(tmp_path):
    path, _ = _save(tmp_path, "RobertaModel")
    runner = make_runner(path, True, dtype="float32")
    ids = torch.tensor([0, 9, 2, 0, PAD, 7, PAD, 2])
    positions = torch.tensor([0, 1, 2, 0, 1, 2, 3, 4])  # two requests, 3 and 5 tokens
    want = transformers.models.roberta.modeling_roberta.RobertaEmbeddings.create_position_ids_from_input_ids(
        ids[None, 3:], PAD)[0]
    got = runner.model.position_ids(ids, positions)
    assert got.tolist()[:3] == [2, 3, 4] and got.tolist()[3:] == want.tolist() == [2, 1, 3, 1, 4]


def test_masked_lm_checkpoint_loads_and_context_excludes_the_pad_offset(tmp_path):
    path, model = _save(tmp_path, "RobertaModel", masked_lm=True)
    cfg = ModelConfig.from_path(path, is_embedding=True)
    assert cfg.is_encoder_only and cfg.context_len == TINY["max_position_embeddings"] - PAD - 1  # 64 of 66 rows
    runner = make_runner(path, True, pooling="mean", dtype="float32")
    longest = [0] + [7] * (cfg.context_len - 2) + [2]  # the last position id is 65, the table's last row
    got = embed(runner, SEQS[:2] + [longest])
    torch.testing.assert_close(got, _reference(model, SEQS[:2] + [longest], PoolingType.MEAN), atol=1e-5, rtol=1e-5)


def test_context_length_past_the_position_table_is_refused(tmp_path):
    path, _ = _save(tmp_path, "XLMRobertaModel")
    assert ModelConfig.from_path(path, context_length=32).context_len == 32
    with pytest.raises(ValueError, match="longer than XLMRobertaModel's learned position table allows \\(64 tokens\\)"):
        ModelConfig.from_path(path, context_length=65)
