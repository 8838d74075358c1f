"""Bad input gets one clear line: from the API as SafeJaxError, from the CLI on stderr with exit code 2."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from safe_jax.errors import SafeJaxError
from safe_jax.sampling.stable_diffusion import StableDiffusion


@pytest.fixture
def folder(tiny_torch_folder, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_torch_folder[0], copy)
    return copy


def _edit_json(path, **changes):
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_missing_folder(tmp_path):
    with pytest.raises(SafeJaxError, match="missing folder"):
        StableDiffusion.from_pretrained(tmp_path / "nope")


def test_unknown_preset():
    with pytest.raises(SafeJaxError, match="unknown preset 'sd99'"):
        StableDiffusion.from_pretrained("sd99")


def test_missing_file(folder):
    (folder / "unet" / "config.json").unlink()
    with pytest.raises(SafeJaxError, match=r"missing file: .*unet/config.json"):
        StableDiffusion.from_pretrained(folder)


def test_missing_weights(folder):
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(SafeJaxError, match=r"no weights in .*vae"):
        StableDiffusion.from_pretrained(folder)


def test_corrupt_safetensors(folder):
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SafeJaxError, match="corrupt safetensors file .*diffusion_pytorch_model.safetensors"):
        StableDiffusion.from_pretrained(folder)


def test_shape_mismatch_names_parameter_and_shapes(folder):
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    state["conv_in.weight"] = np.zeros((32, 5, 3, 3), np.float32)
    save_file(state, path)
    with pytest.raises(SafeJaxError, match=r"'conv_in.weight' has shape \(32, 5, 3, 3\) .* needs \(32, 4, 3, 3\)"):
        StableDiffusion.from_pretrained(folder)


def test_missing_and_unexpected_tensors(folder):
    path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    state["decoder.extra.weight"] = state.pop("decoder.conv_out.weight")
    save_file(state, path)
    with pytest.raises(SafeJaxError, match="1 missing .*decoder.conv_out.weight.*1 unexpected .*decoder.extra.weight"):
        StableDiffusion.from_pretrained(folder)


@pytest.mark.parametrize("component,change,message", [
    ("unet", {"class_embed_type": "timestep"}, "unsupported UNet architecture: class_embed_type='timestep'"),
    ("unet", {"down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]},
     "unsupported UNet architecture: down_block_types contains SimpleCrossAttnDownBlock2D"),
    ("vae", {"up_block_types": ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]}, "unsupported VAE architecture"),
    ("text_encoder", {"hidden_act": "relu"}, "hidden_act 'relu' is not supported"),
])
def test_unsupported_architecture(folder, component, change, message):
    _edit_json(folder / component / "config.json", **change)
    with pytest.raises(SafeJaxError, match=message):
        StableDiffusion.from_pretrained(folder)


def test_bin_weights_load_with_weights_only(folder, tiny_torch_folder):
    path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    state = {k: torch.from_numpy(v) for k, v in load_file(path).items()}
    torch.save(state, folder / "vae" / "diffusion_pytorch_model.bin")
    path.unlink()
    _, params = StableDiffusion.from_pretrained(folder)
    _, ref = StableDiffusion.from_pretrained(tiny_torch_folder[0])
    leaves = lambda tree: jax.tree.leaves(tree)
    assert len(leaves(params["vae"])) == len(leaves(ref["vae"])) > 0
    assert all(np.array_equal(a, b) for a, b in zip(leaves(params["vae"]), leaves(ref["vae"])))


class _Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_malicious_bin_is_refused(folder):
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with open(folder / "vae" / "diffusion_pytorch_model.bin", "wb") as f:
        pickle.dump({"x": _Exploit()}, f)
    with pytest.raises(SafeJaxError, match=r"cannot read .*weights_only=True"):
        StableDiffusion.from_pretrained(folder)


def test_generate_rejects_bad_arguments():
    pipe, params = StableDiffusion.from_pretrained("tiny")
    with pytest.raises(SafeJaxError, match="unknown scheduler"):
        pipe.generate(params, ["x"], scheduler="plms")
    with pytest.raises(SafeJaxError, match="height must be a positive multiple of 2"):  # the tiny VAE's downscale
        pipe.generate(params, ["x"], height=67)
    with pytest.raises(SafeJaxError, match="matches neither NCHW"):
        pipe.generate(params, ["x"], latents=np.zeros((1, 3, 32, 32)))
    with pytest.raises(SafeJaxError, match="2 prompts but 1 negative"):
        pipe.generate(params, ["x", "y"], negative_prompts=["z"])


def test_cli_prints_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "launch.export", "--model", str(tmp_path / "absent"),
                          "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"safe-jax export: error: missing folder: {tmp_path / 'absent'} "
                                               "(nor is it a preset: sd15, sd21, sd21-base, tiny, sdxl, tiny-xl, tiny-anchor)"]
