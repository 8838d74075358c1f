"""Shared fixtures: tiny random PyTorch diffusers pipelines saved as local folders (nothing downloaded)."""

from __future__ import annotations

import numpy as np
import pytest


def rel_l2(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def torch_pipeline(preset: str = "tiny", prediction_type: str = "epsilon", seed: int = 0):
    """A diffusers StableDiffusionPipeline with random weights and our preset's architecture."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from safe_jax import presets, tokenizer
    from safe_jax.models import clip_text
    from safe_jax.models.unet import UNetConfig
    from safe_jax.models.vae import VAEConfig

    spec = presets.preset(preset)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(UNetConfig.from_diffusers(spec["unet"]).to_diffusers())
    vae = AutoencoderKL.from_config(VAEConfig.from_diffusers(spec["vae"]).to_diffusers())
    text = CLIPTextModel(CLIPTextConfig(**clip_text.preset(spec["text_encoder"]).to_hf()))
    # Torch's default init leaves norms at identity and biases near zero; perturb every tensor so
    # that a swapped scale/bias or a wrong transpose cannot hide.
    with torch.no_grad():
        for module in (unet, vae, text):
            for p in module.parameters():
                p.add_(0.05 * torch.randn_like(p))
    scheduler = DDIMScheduler.from_config(dict(spec["scheduler"], prediction_type=prediction_type))
    return StableDiffusionPipeline(
        unet=unet.eval(), vae=vae.eval(), text_encoder=text.eval(), tokenizer=tokenizer.tiny_tokenizer(),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


@pytest.fixture(scope="session")
def tiny_torch_folder(tmp_path_factory):
    """A tiny SD1-style diffusers folder written by diffusers itself, and its pipeline."""
    pipe = torch_pipeline("tiny")
    folder = tmp_path_factory.mktemp("tiny_sd") / "pipe"
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder, pipe
