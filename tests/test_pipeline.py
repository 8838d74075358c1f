"""The whole pipeline against diffusers' StableDiffusionPipeline, and the import/export round trip."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from safe_jax.sampling.stable_diffusion import StableDiffusion

PROMPTS = ["London's mayor Boris Johnson gives a big thumbs up on Tower Bridge.", "a photo of a cat"]


def _latents(pipe: StableDiffusion, batch: int, seed: int = 0) -> np.ndarray:
    s = pipe.unet.config.sample_size
    return np.random.RandomState(seed).randn(batch, 4, s, s).astype(np.float32)  # NCHW, as diffusers takes it


def _diffusers_images(torch_pipe, latents, steps=10, guidance=7.5, scheduler=None) -> np.ndarray:
    if scheduler is not None:
        torch_pipe.scheduler = scheduler
    with torch.no_grad():
        return torch_pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance,
                          latents=torch.from_numpy(latents), output_type="np").images


@pytest.fixture(scope="module")
def loaded(tiny_torch_folder):
    folder, torch_pipe = tiny_torch_folder
    pipe, params = StableDiffusion.from_pretrained(folder)
    return pipe, params, torch_pipe


def test_generate_matches_diffusers_ddim(loaded):
    pipe, params, torch_pipe = loaded
    latents = _latents(pipe, len(PROMPTS))
    ours = pipe.generate(params, PROMPTS, num_steps=10, guidance_scale=7.5, scheduler="ddim", latents=latents)
    ref = _diffusers_images(torch_pipe, latents)
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    assert np.abs(ours / 255.0 - ref).mean() <= 1 / 255
    # The images are not trivial: they vary, and the prompts make a difference.
    assert ours.std() > 5 and np.abs(ours[0].astype(int) - ours[1]).mean() > 1


def test_generate_matches_diffusers_dpmpp_2m(loaded):
    from diffusers import DPMSolverMultistepScheduler

    pipe, params, torch_pipe = loaded
    latents = _latents(pipe, len(PROMPTS), seed=3)
    ours = pipe.generate(params, PROMPTS, num_steps=8, scheduler="dpm++2m", latents=latents)
    scheduler = DPMSolverMultistepScheduler.from_config(torch_pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                        solver_order=2)
    ref = _diffusers_images(torch_pipe, latents, steps=8, scheduler=scheduler)
    assert np.abs(ours / 255.0 - ref).mean() <= 1 / 255


def test_latents_layouts_and_seeds(loaded):
    pipe, params, _ = loaded
    nchw = _latents(pipe, 2)
    a = pipe.generate(params, PROMPTS, num_steps=3, latents=nchw)
    b = pipe.generate(params, PROMPTS, num_steps=3, latents=nchw.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(a, b)
    s1 = pipe.generate(params, PROMPTS, num_steps=3, seed=1)
    np.testing.assert_array_equal(s1, pipe.generate(params, PROMPTS, num_steps=3, seed=1))
    assert np.abs(s1.astype(int) - pipe.generate(params, PROMPTS, num_steps=3, seed=2)).mean() > 1


def _tensors(folder: Path, component: str) -> dict[str, np.ndarray]:
    files = sorted((folder / component).glob("*.safetensors"))
    assert len(files) == 1, files
    tensors = load_file(files[0])
    # transformers 5 saves CLIPTextModel without the "text_model." prefix; hub checkpoints have it.
    return {k.removeprefix("text_model."): v for k, v in tensors.items()}


def test_import_export_is_bitwise(loaded, tiny_torch_folder, tmp_path):
    pipe, params, _ = loaded
    folder, _ = tiny_torch_folder
    out = pipe.save_pretrained(params, tmp_path / "export")
    for component in ("unet", "vae", "text_encoder"):
        original, exported = _tensors(folder, component), _tensors(out, component)
        assert original.keys() == exported.keys(), component
        for k in original:
            assert original[k].dtype == exported[k].dtype and np.array_equal(original[k], exported[k]), k


def test_export_loads_in_diffusers_and_reproduces(loaded, tmp_path):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    pipe, params, _ = loaded
    out = pipe.save_pretrained(params, tmp_path / "export")
    for cls, sub in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae")):
        _, info = cls.from_pretrained(out / sub, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    _, info = CLIPTextModel.from_pretrained(out / "text_encoder", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info

    reloaded = StableDiffusionPipeline.from_pretrained(out)
    latents = _latents(pipe, len(PROMPTS), seed=5)
    ours = pipe.generate(params, PROMPTS, num_steps=10, latents=latents)
    assert np.abs(ours / 255.0 - _diffusers_images(reloaded, latents)).mean() <= 1 / 255


def test_fp16_export(loaded, tmp_path):
    pipe, params, _ = loaded
    out = pipe.save_pretrained(params, tmp_path / "fp16", dtype="float16")
    unet = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(v.dtype == np.float16 for v in unet.values())
    again, params16 = StableDiffusion.from_pretrained(out)
    w = params["unet"]["conv_in"]["kernel"]
    np.testing.assert_array_equal(params16["unet"]["conv_in"]["kernel"], np.asarray(w).astype(np.float16).astype(np.float32))


def test_generate_shards_the_batch_over_devices(tiny_torch_folder, tmp_path):
    """Four virtual CPU devices and a batch of three (padded to four) give the one-device images."""
    folder, _ = tiny_torch_folder
    script = textwrap.dedent(f"""
        import os, sys
        import numpy as np, jax
        from safe_jax.sampling.stable_diffusion import StableDiffusion
        pipe, params = StableDiffusion.from_pretrained({str(folder)!r})
        images = pipe.generate(params, ["a", "b c", "d"], num_steps=3, seed=7)
        np.save(sys.argv[1], images)
        print(len(jax.local_devices()))
    """)
    outs = {}
    for n in (1, 4):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu")
        path = tmp_path / f"{n}.npy"
        res = subprocess.run([sys.executable, "-c", script, str(path)], env=env, capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        assert res.stdout.strip().splitlines()[-1] == str(n)
        outs[n] = np.load(path)
    assert outs[4].shape == (3, 64, 64, 3)
    assert np.abs(outs[1].astype(int) - outs[4]).max() <= 1
