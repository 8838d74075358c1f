"""The Flax CLIP text encoder against transformers' PyTorch one, and the offline CLIP tokenizer."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

from safe_jax.errors import SafeJaxError
from safe_jax.io.convert import flax_to_torch, torch_to_flax
from safe_jax.models.clip_text import (
    PRESETS,
    CLIPTextConfig,
    CLIPTextModel,
    abstract_params,
    from_hf_state_dict,
    to_hf_state_dict,
)
from safe_jax.text.tokenizer import (
    bundled_clip_vocab_dir,
    load_tokenizer,
    save_tokenizer,
    tiny_tokenizer,
    tokenize,
)

PROMPTS = [
    "a photo of a cat",
    "Firefighters at a flooded street in Leeds.",
    "A photo of Boris Johnson on Tower Bridge, " * 12,  # longer than 77 tokens: truncated
]
# SD 1.x: modern ids (EOS pooling, pads with EOS). SD 2.x: legacy eos_token_id=2 (argmax
# pooling) and its tokenizer pads with "!" (id 0), so the two pooler code paths both run.
SD1_STYLE = PRESETS["tiny"]
SD2_STYLE = dataclasses.replace(PRESETS["tiny"], hidden_act="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def torch_model(cfg: CLIPTextConfig, seed: int = 0) -> transformers.CLIPTextModel:
    """transformers' model with random weights, LayerNorms perturbed so scale/bias mix-ups show."""
    torch.manual_seed(seed)
    hf_config = transformers.CLIPTextConfig(**cfg.to_hf())
    model = transformers.CLIPTextModel._from_config(hf_config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def numpy_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.mark.parametrize("cfg", [SD1_STYLE, SD2_STYLE], ids=["sd1_quick_gelu", "sd2_gelu_legacy_eos"])
def test_parity_with_transformers(cfg, tokenizer):
    if cfg.eos_token_id == 2:
        tokenizer = transformers.CLIPTokenizer.from_pretrained(str(bundled_clip_vocab_dir()), pad_token="!")
    ids = tokenize(tokenizer, PROMPTS)
    assert ids.shape == (3, 77)
    pt = torch_model(cfg)
    with torch.no_grad():
        expected = pt(torch.from_numpy(ids).long(), output_hidden_states=True)
        skip1 = pt.final_layer_norm(expected.hidden_states[-2])  # diffusers' clip_skip=1

    model = CLIPTextModel(cfg)
    params = from_hf_state_dict(numpy_state_dict(pt), model)
    out = jax.jit(lambda p, x: model.apply({"params": p}, x, clip_skip=1))(params, jnp.asarray(ids))

    assert len(out["hidden_states"]) == len(expected.hidden_states) == cfg.num_hidden_layers + 1
    for ours, theirs in zip(out["hidden_states"], expected.hidden_states):
        assert rel_err(ours, theirs) <= 1e-5
    assert rel_err(out["last_hidden_state"], expected.last_hidden_state) <= 1e-5
    assert rel_err(out["hidden_states"][-2], expected.hidden_states[-2]) <= 1e-5
    assert rel_err(out["encoded"], skip1) <= 1e-5
    assert rel_err(out["pooler_output"], expected.pooler_output) <= 1e-5
    # The pooler picked the real EOS, not a pad: row 0 is "<sot> a photo of a cat <eot>".
    np.testing.assert_allclose(out["pooler_output"][0], out["last_hidden_state"][0, 6], rtol=0, atol=0)
    # clip_skip=0 is the plain final state.
    plain = model.apply({"params": params}, jnp.asarray(ids))
    np.testing.assert_array_equal(plain["encoded"], plain["last_hidden_state"])


def test_state_dict_round_trip_is_bitwise():
    pt = torch_model(SD2_STYLE, seed=1)
    sd = numpy_state_dict(pt)
    # transformers 5 keeps position_ids as a non-persistent buffer and has no "text_model." level.
    assert not any("position_ids" in k for k in sd)
    assert not any(k.startswith("text_model.") for k in sd)
    checkpoint = {"text_model." + k: v for k, v in sd.items()}  # the hub / to_hf_state_dict layout

    back = flax_to_torch(torch_to_flax(checkpoint, abstract_params(CLIPTextModel(SD2_STYLE))))
    assert set(back) == set(checkpoint)
    for key, value in checkpoint.items():
        assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key

    # Legacy checkpoints carry the position_ids buffer: accepted and dropped.
    legacy = {**checkpoint, "text_model.embeddings.position_ids": np.arange(77)[None]}
    params = from_hf_state_dict(legacy, CLIPTextModel(SD2_STYLE))
    assert set(to_hf_state_dict(params)) == set(checkpoint)


def test_export_loads_in_transformers(tmp_path, tokenizer):
    """Our config.json + weights load with CLIPTextModel.from_pretrained and give the same output."""
    model = CLIPTextModel(SD1_STYLE)
    ids = tokenize(tokenizer, PROMPTS[:2])
    params = model.init(jax.random.key(3), jnp.asarray(ids))["params"]
    (tmp_path / "config.json").write_text(json.dumps(SD1_STYLE.to_hf()))
    save_file(to_hf_state_dict(params), str(tmp_path / "model.safetensors"))
    pt = transformers.CLIPTextModel.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    with torch.no_grad():
        expected = pt(torch.from_numpy(ids).long())
    ours = model.apply({"params": params}, jnp.asarray(ids))
    assert rel_err(ours["last_hidden_state"], expected.last_hidden_state) <= 1e-5
    assert rel_err(ours["pooler_output"], expected.pooler_output) <= 1e-5


@pytest.mark.parametrize("name, known", [("sd15", 123_060_480), ("sd21", 340_387_840)])
def test_full_size_parameter_counts(name, known):
    cfg = PRESETS[name]
    ours = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract_params(CLIPTextModel(cfg))))
    with torch.device("meta"):
        theirs = sum(p.numel() for p in transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg.to_hf())).parameters())
    assert ours == theirs == known


def test_config_round_trip_and_rejections():
    hf = {**PRESETS["sd21"].to_hf(), "_name_or_path": "stabilityai/stable-diffusion-2-1", "dropout": 0.0}
    cfg = CLIPTextConfig.from_hf(hf)
    assert cfg == PRESETS["sd21"]
    assert cfg.to_hf() == hf
    with pytest.raises(SafeJaxError, match="hidden_act 'gelu_new'"):
        CLIPTextConfig.from_hf({**hf, "hidden_act": "gelu_new"})
    with pytest.raises(SafeJaxError, match="lacks hidden_size"):
        CLIPTextConfig.from_hf({k: v for k, v in hf.items() if k != "hidden_size"})
    with pytest.raises(SafeJaxError, match="clip_skip"):
        model = CLIPTextModel(PRESETS["tiny"])
        jax.eval_shape(functools.partial(model.init, clip_skip=5), jax.random.key(0), jnp.zeros((1, 77), jnp.int32))


def test_tokenizer_matches_clip(tokenizer, tmp_path):
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    ids = tokenize(tokenizer, PROMPTS)
    assert ids.dtype == np.int32 and ids.shape == (3, 77)
    assert list(ids[0, :8]) == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]  # pads with EOS
    assert ids[2, 0] == 49406 and ids[2, -1] == 49407  # truncated, EOS kept

    saved = tmp_path / "tokenizer"
    save_tokenizer(tokenizer, saved)
    np.testing.assert_array_equal(tokenize(load_tokenizer(saved), PROMPTS), ids)
    assert (saved / "vocab.json").read_bytes() != b"" and (saved / "merges.txt").is_file()
    (saved / "tokenizer.json").unlink()  # the transformers 4 / hub layout: vocab.json + merges.txt
    np.testing.assert_array_equal(tokenize(load_tokenizer(saved), PROMPTS), ids)
    with pytest.raises(SafeJaxError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    (saved / "merges.txt").unlink()
    with pytest.raises(SafeJaxError, match="lacks merges.txt"):
        load_tokenizer(saved)


def test_bundled_vocab_is_built_in_xdg_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = bundled_clip_vocab_dir.__wrapped__()  # bypass the per-process cache
    assert folder == tmp_path / "safe_jax" / "clip_vocab"
    assert sorted(p.name for p in folder.iterdir()) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert len((folder / "merges.txt").read_text(encoding="utf-8").splitlines()) == 1 + 48894
