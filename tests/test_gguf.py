"""GGUF export: tiny Llama / Mistral / Qwen2 checkpoints written by save_pretrained, converted with
write_gguf and read back with the gguf package's own reader."""

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from safetensors.torch import load_file  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM, LlamaConfig, MistralConfig, PreTrainedTokenizerFast, Qwen2Config,
)

from qlora.export.gguf import permute_for_llama_rope, write_gguf  # noqa: E402

GT = gguf.GGMLQuantizationType
VOCAB = 320  # more rows than the tokenizer has tokens, so padding placeholders are exercised
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
SHAPES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, rms_norm_eps=1e-5,
              bos_token_id=0, eos_token_id=1)


def _tokenizer():
    # A byte-level BPE trained on a few sentences: real merges, the 256-byte alphabet, two specials.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20 + ["hello world, hello there"] * 20,
                            trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    tokenizer = _tokenizer()
    configs = {
        "llama": LlamaConfig(**SHAPES, tie_word_embeddings=False),
        "mistral": MistralConfig(**SHAPES, tie_word_embeddings=True, sliding_window=None),
        "qwen2": Qwen2Config(**SHAPES, tie_word_embeddings=False),
    }
    dirs = {}
    for name, config in configs.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs[name] = path
    return dirs


def _fields(reader):
    return {name: field.contents() for name, field in reader.fields.items()}


def _expected_tensors(model_dir, model_type):
    """The HF weights under their GGUF names, q/k permuted for the llama architecture."""
    config = json.loads((model_dir / "config.json").read_text())
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2 if model_type == "qwen2" else gguf.MODEL_ARCH.LLAMA,
                                        config["num_hidden_layers"])
    expected = {}
    for key, value in load_file(model_dir / "model.safetensors").items():
        value = value.float().numpy()
        if model_type != "qwen2" and "q_proj" in key:
            value = permute_for_llama_rope(value, config["num_attention_heads"])
        elif model_type != "qwen2" and "k_proj" in key:
            value = permute_for_llama_rope(value, config["num_key_value_heads"])
        expected[name_map.get_name(key, try_suffixes=(".weight", ".bias"))] = value
    return expected


@pytest.mark.parametrize("gguf_type", ["f16", "bf16", "q8_0"])
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_write_gguf_round_trip(checkpoints, tmp_path, model_type, gguf_type):
    model_dir = checkpoints[model_type]
    out = write_gguf(model_dir, tmp_path / "model.gguf", gguf_type)
    assert out == tmp_path / "model.gguf" and not (tmp_path / "model.gguf.tmp").exists()
    reader = gguf.GGUFReader(out)
    fields = _fields(reader)

    arch = "qwen2" if model_type == "qwen2" else "llama"
    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.context_length"] == 256
    assert fields[f"{arch}.embedding_length"] == 64
    assert fields[f"{arch}.block_count"] == 2
    assert fields[f"{arch}.feed_forward_length"] == 128
    assert fields[f"{arch}.attention.head_count"] == 4
    assert fields[f"{arch}.attention.head_count_kv"] == 2
    assert fields[f"{arch}.rope.dimension_count"] == 16
    assert fields[f"{arch}.rope.freq_base"] == pytest.approx(
        json.loads((model_dir / "config.json").read_text())["rope_parameters"]["rope_theta"])
    assert fields[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert fields[f"{arch}.vocab_size"] == VOCAB
    file_types = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    assert fields["general.file_type"] == file_types[gguf_type]

    # Tokenizer: every embedding row has a token; trained tokens, merges and specials round-trip.
    hf_tok = json.loads((model_dir / "tokenizer.json").read_text())
    tokens = fields["tokenizer.ggml.tokens"]
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2"
    assert len(tokens) == VOCAB
    for token, token_id in hf_tok["model"]["vocab"].items():
        assert tokens[token_id] == token
    types = fields["tokenizer.ggml.token_type"]
    assert types[0] == types[1] == gguf.TokenType.CONTROL  # <s>, </s>
    assert types[2] == gguf.TokenType.NORMAL
    assert tokens[-1] == f"[PAD{VOCAB - 1}]" and types[-1] == gguf.TokenType.UNUSED
    assert fields["tokenizer.ggml.merges"] == [" ".join(m) for m in hf_tok["model"]["merges"]]
    assert fields["tokenizer.ggml.bos_token_id"] == 0
    assert fields["tokenizer.ggml.eos_token_id"] == 1
    assert fields["tokenizer.chat_template"] == CHAT_TEMPLATE

    # Tensors: the expected set, shapes (GGUF lists dims innermost first) and values.
    expected = _expected_tensors(model_dir, model_type)
    names = {t.name for t in reader.tensors}
    assert names == set(expected)
    assert "blk.1.attn_q.weight" in names and "output_norm.weight" in names
    assert ("output.weight" in names) == (model_type != "mistral")  # mistral is tied here
    assert ("blk.0.attn_q.bias" in names) == (model_type == "qwen2")
    for t in reader.tensors:
        want = expected[t.name]
        assert list(t.shape) == list(reversed(want.shape)), t.name
        if want.ndim == 1:
            assert t.tensor_type == GT.F32, t.name
            np.testing.assert_array_equal(t.data, want, err_msg=t.name)
            continue
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        if gguf_type == "f16":
            assert t.tensor_type == GT.F16
            np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32), err_msg=t.name)
        elif gguf_type == "bf16":
            assert t.tensor_type == GT.BF16
            cast = torch.from_numpy(want).to(torch.bfloat16).float().numpy()
            np.testing.assert_array_equal(got, cast, err_msg=t.name)
        else:
            assert t.tensor_type == GT.Q8_0
            # Q8_0: per 32-value block, int8 steps of absmax/127: rounding costs half a step, and the
            # step itself is stored as f16 (relative error 2^-11, times up to 127 steps).
            blocks = want.reshape(-1, 32)
            step = np.abs(blocks).max(axis=1, keepdims=True) / 127
            assert np.all(np.abs(got.reshape(-1, 32) - blocks) <= step * (0.5 + 127 * 2.0**-11) + 1e-8), t.name


def test_permutation_turns_hf_rope_into_llama_cpp_rope():
    # Why the q/k permutation: HF rotates pairs (j, j + d/2) within a head, llama.cpp's llama
    # architecture rotates adjacent pairs (2j, 2j + 1). Permuted weights must give the same
    # rotated vector, up to the same row reordering.
    n_head, head_dim, hidden = 2, 8, 6
    rng = np.random.default_rng(0)
    weight, x = rng.standard_normal((n_head * head_dim, hidden)), rng.standard_normal(hidden)
    theta = 0.7 * 10000.0 ** (-np.arange(0, head_dim, 2) / head_dim)
    cos, sin = np.cos(theta), np.sin(theta)

    def rope_hf(v):
        v = v.reshape(n_head, 2, head_dim // 2)
        return np.stack([v[:, 0] * cos - v[:, 1] * sin, v[:, 1] * cos + v[:, 0] * sin], axis=1).reshape(-1)

    def rope_interleaved(v):
        v = v.reshape(n_head, head_dim // 2, 2)
        return np.stack([v[..., 0] * cos - v[..., 1] * sin, v[..., 1] * cos + v[..., 0] * sin], axis=-1).reshape(-1)

    permuted = permute_for_llama_rope(weight, n_head)
    reorder = permute_for_llama_rope(np.arange(n_head * head_dim), n_head)
    np.testing.assert_allclose(rope_interleaved(permuted @ x), rope_hf(weight @ x)[reorder], rtol=1e-12)


def test_llama3_rope_scaling_writes_rope_freqs(tmp_path):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    config = LlamaConfig(**SHAPES, rope_parameters=rope)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    _tokenizer().save_pretrained(tmp_path / "m")
    reader = gguf.GGUFReader(write_gguf(tmp_path / "m", tmp_path / "m.gguf"))
    factors = next(t for t in reader.tensors if t.name == "rope_freqs.weight").data
    # Oracle: transformers' own llama3 inverse frequencies are the plain ones divided by the factors.
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (rope["rope_theta"] ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    np.testing.assert_allclose(factors, (plain / scaled).numpy(), rtol=1e-5)


def test_unsupported_model_type(checkpoints, tmp_path):
    bad = tmp_path / "neox"
    bad.mkdir()
    config = json.loads((checkpoints["llama"] / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    with pytest.raises(ValueError, match=r"gpt_neox.*llama, mistral, qwen2"):
        write_gguf(bad, tmp_path / "out.gguf")
    assert not list(tmp_path.glob("out.gguf*"))


def test_missing_files(checkpoints, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        write_gguf(tmp_path, tmp_path / "out.gguf")
    (tmp_path / "config.json").write_text((checkpoints["llama"] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="safetensors"):
        write_gguf(tmp_path, tmp_path / "out.gguf")
    (tmp_path / "model.safetensors").symlink_to(checkpoints["llama"] / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        write_gguf(tmp_path, tmp_path / "out.gguf")
    assert not list(tmp_path.glob("out.gguf*"))  # nothing half-written is left behind
    with pytest.raises(ValueError, match="gguf_type"):
        write_gguf(checkpoints["llama"], tmp_path / "out.gguf", "q4_0")


def test_non_bpe_tokenizer_is_refused(checkpoints, tmp_path):
    model_dir = tmp_path / "wordlevel"
    model_dir.mkdir()
    for name in ("config.json", "model.safetensors"):
        (model_dir / name).symlink_to(checkpoints["llama"] / name)
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(model_dir / "tokenizer.json"))
    with pytest.raises(ValueError, match="byte-level BPE.*'WordLevel'"):
        write_gguf(model_dir, tmp_path / "out.gguf")


def test_sharded_checkpoint(checkpoints, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(checkpoints["llama"])
    model.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    _tokenizer().save_pretrained(tmp_path / "sharded")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    sharded = gguf.GGUFReader(write_gguf(tmp_path / "sharded", tmp_path / "sharded.gguf"))
    single = gguf.GGUFReader(write_gguf(checkpoints["llama"], tmp_path / "single.gguf"))
    by_name = {t.name: t for t in single.tensors}
    assert len(sharded.tensors) == len(by_name)
    for t in sharded.tensors:
        np.testing.assert_array_equal(t.data, by_name[t.name].data, err_msg=t.name)


def test_general_name_is_the_given_name_not_a_temporary_folder(checkpoints, tmp_path):
    # qlora export writes from a hidden work folder and passes the output folder's name.
    named = _fields(gguf.GGUFReader(write_gguf(checkpoints["llama"], tmp_path / "a.gguf", name="merged_gguf")))
    assert named["general.name"] == "merged_gguf"
    default = _fields(gguf.GGUFReader(write_gguf(checkpoints["llama"], tmp_path / "b.gguf")))
    assert default["general.name"] == checkpoints["llama"].name
