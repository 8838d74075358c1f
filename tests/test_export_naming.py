"""The text encoder's tensor names survive import → export: hub checkpoints spell them
``text_model.embeddings.…``, transformers 5's ``save_pretrained`` spells them ``embeddings.…``;
``save_pretrained`` writes back the spelling it loaded, so the round trip is bitwise either way."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from safe_jax.errors import SafeJaxError
from safe_jax.models import clip_text
from safe_jax.sampling.stable_diffusion import StableDiffusion

PREFIX = "text_model."


def _text_tensors(folder):
    files = sorted((folder / "text_encoder").glob("*.safetensors"))
    assert len(files) == 1, files
    return load_file(files[0])


def test_transformers_5_saves_without_the_prefix(tiny_torch_folder):
    # The fixture's folder is written by diffusers + the installed transformers (5.x).
    keys = list(_text_tensors(tiny_torch_folder[0]))
    assert keys and not any(k.startswith(PREFIX) for k in keys)


@pytest.fixture(params=["hub", "transformers5"])
def source(request, tiny_torch_folder, tmp_path):
    """A copy of the tiny diffusers folder whose text encoder uses one key spelling."""
    folder = tmp_path / "source"
    shutil.copytree(tiny_torch_folder[0], folder)
    path = folder / "text_encoder" / "model.safetensors"
    state = load_file(path)
    if request.param == "hub":
        state = {PREFIX + k.removeprefix(PREFIX): v for k, v in state.items()}
    else:
        state = {k.removeprefix(PREFIX): v for k, v in state.items()}
    save_file(state, path, metadata={"format": "pt"})
    return request.param, folder


def test_round_trip_keeps_the_key_spelling_bitwise(source, tmp_path):
    style, folder = source
    pipe, params = StableDiffusion.from_pretrained(folder)
    assert pipe.text_encoder.config.state_dict_prefix == (PREFIX if style == "hub" else "")
    out = pipe.save_pretrained(params, tmp_path / "export")
    original, exported = _text_tensors(folder), _text_tensors(out)
    assert list(original) == list(exported)  # same names (load_file sorts them)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype and exported[key].shape == value.shape, key
        assert exported[key].tobytes() == value.tobytes(), key
    # The spelling is not part of the config.json written for transformers.
    assert "state_dict_prefix" not in (out / "text_encoder" / "config.json").read_text()


def test_export_loads_in_transformers_and_diffusers(source, tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    _, folder = source
    pipe, params = StableDiffusion.from_pretrained(folder)
    out = pipe.save_pretrained(params, tmp_path / "export")
    _, info = CLIPTextModel.from_pretrained(out / "text_encoder", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info

    # diffusers has no loading info for a whole pipeline: a missing tensor would be randomly
    # initialised, so every tensor of the loaded text encoder must equal the exported one.
    reloaded = StableDiffusionPipeline.from_pretrained(out)
    exported = {k.removeprefix(PREFIX): v for k, v in _text_tensors(out).items()}
    loaded = {k.removeprefix(PREFIX): v for k, v in reloaded.text_encoder.state_dict().items()}
    assert exported.keys() == loaded.keys()
    for key, value in loaded.items():
        assert torch.equal(value, torch.from_numpy(exported[key])), key


def test_presets_export_in_the_transformers_5_spelling(tmp_path):
    pipe, params = StableDiffusion.from_pretrained("tiny")
    assert pipe.text_encoder.config.state_dict_prefix == ""
    keys = list(_text_tensors(pipe.save_pretrained(params, tmp_path / "export")))
    assert keys and not any(k.startswith(PREFIX) for k in keys)


def test_state_dict_prefix_helpers():
    assert clip_text.state_dict_prefix({"text_model.a": 0, "text_model.b": 0, "c": 0}) == PREFIX
    assert clip_text.state_dict_prefix({"a": 0, "text_model.b": 0}) == ""
    assert clip_text.state_dict_prefix({}) == ""
    params = {"text_model": {"final_layer_norm": {"scale": np.ones(2, np.float32), "bias": np.zeros(2, np.float32)}}}
    assert set(clip_text.to_hf_state_dict(params)) == {"text_model.final_layer_norm.weight",
                                                       "text_model.final_layer_norm.bias"}
    assert set(clip_text.to_hf_state_dict(params, "")) == {"final_layer_norm.weight", "final_layer_norm.bias"}
    with pytest.raises(SafeJaxError, match="key prefix must be"):
        clip_text.to_hf_state_dict(params, "model.")


def test_both_spellings_of_one_tensor_are_refused():
    model = clip_text.CLIPTextModel(clip_text.preset("tiny"))
    w = np.zeros((49408, 32), np.float32)
    with pytest.raises(SafeJaxError, match="'embeddings.token_embedding.weight' both with and without"):
        clip_text.from_hf_state_dict({"embeddings.token_embedding.weight": w,
                                      "text_model.embeddings.token_embedding.weight": w}, model)
