"""sentence-transformers' tokenizer settings for embedding models: max_seq_length becomes the context length
(MiniLM: 256, where BERT's table has 512, as sentence-transformers truncates), do_lower_case lowercases text."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from sglx.srt.configs.model_config import ModelConfig
from sglx.srt.layers.pooler import StTokenizerConfig, read_sentence_transformers_tokenizer_config
from sglx.srt.managers.tokenizer_manager import TokenizerManager
from test.unit.test_embedding_model import minilm_path

BERT = {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": 100, "hidden_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 512,
        "type_vocab_size": 2}


def _model_dir(tmp_path, st_name=None, st=None, arch="BertModel"):
    (tmp_path / "config.json").write_text(json.dumps({**BERT, "architectures": [arch]}))
    if st_name:
        (tmp_path / st_name).write_text(json.dumps(st))
    return str(tmp_path)


def test_minilm_context_is_sentence_transformers_max_seq_length():
    path = minilm_path()
    assert read_sentence_transformers_tokenizer_config(path) == StTokenizerConfig(256, False)
    assert ModelConfig.from_path(path).context_len == 256
    assert ModelConfig.from_path(path, context_length=512).context_len == 512  # the table allows it if asked


@pytest.mark.parametrize("name", ["sentence_bert_config.json", "sentence_xlm-roberta_config.json"])
def test_reader_finds_each_family_file(tmp_path, name):
    path = _model_dir(tmp_path, name, {"max_seq_length": 128, "do_lower_case": True})
    assert read_sentence_transformers_tokenizer_config(path) == StTokenizerConfig(128, True)
    config = ModelConfig.from_path(path)
    assert config.context_len == 128 and config.st_tokenizer == StTokenizerConfig(128, True)


def test_no_file_or_no_limit_keeps_the_table(tmp_path):
    assert read_sentence_transformers_tokenizer_config(_model_dir(tmp_path)) is None
    assert ModelConfig.from_path(str(tmp_path)).context_len == 512
    _model_dir(tmp_path, "sentence_bert_config.json", {"max_seq_length": None})
    assert read_sentence_transformers_tokenizer_config(str(tmp_path)) == StTokenizerConfig(None, False)
    assert ModelConfig.from_path(str(tmp_path)).context_len == 512
    _model_dir(tmp_path, "sentence_bert_config.json", {"max_seq_length": 4096})  # longer than the table
    assert ModelConfig.from_path(str(tmp_path)).context_len == 512


def test_generation_models_ignore_the_file(tmp_path):
    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 100, "hidden_size": 32,
             "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 2048}
    (tmp_path / "config.json").write_text(json.dumps(llama))
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64}))
    assert ModelConfig.from_path(str(tmp_path)).context_len == 2048
    assert ModelConfig.from_path(str(tmp_path), is_embedding=True).context_len == 64


@pytest.mark.parametrize("lowercase", [False, True])
def test_do_lower_case_lowercases_text_before_tokenizing(lowercase):
    seen = []

    def tokenizer(text, truncation, max_length):
        seen.append(text)
        return {"input_ids": [1, 2, 3]}

    tm = SimpleNamespace(max_req_input_len=16, vocab_size=100, embedding_lowercase=lowercase)
    out = TokenizerManager._tokenize_embedding(tm, "Hello World", None, "r1", False, tokenizer)
    assert seen == ["hello world" if lowercase else "Hello World"] and out.input_ids == [1, 2, 3]
