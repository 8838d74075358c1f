"""Shared fixtures: tiny random PyTorch diffusers pipelines saved as local folders (nothing downloaded)."""

from __future__ import annotations

import numpy as np
import pytest


def rel_l2(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def ulp_distance_f32(a, b) -> np.ndarray:
    """How many float32 values lie between a and b, elementwise (0 when equal, +0 and -0 equal).

    Both sides are rounded to float32 first. The bit patterns are mapped to integers that are
    ordered like the floats, so the distance is scale-free and well defined across zero.
    """

    def ordered(x):
        bits = np.asarray(x, np.float32).view(np.int32).astype(np.int64)
        return np.where(bits < 0, -(bits & 0x7FFFFFFF), bits)

    return np.abs(ordered(a) - ordered(b))


def assert_close_f32(ours, ref, ulps: int = 4, err_msg: str = "") -> None:
    """Assert that float32 values computed by two libraries agree to within `ulps` float32 ulps.

    Use this, not ==, assert_array_equal or a tiny rtol, when the same float32 formula is
    evaluated independently by torch, numpy and/or XLA. Their last bits depend on the machine:
    torch picks its CPU kernels at run time (ATEN_CPU_CAPABILITY: default / AVX2 / AVX-512, with
    different vectorised pow/sqrt/exp, fused multiply-adds and reduction orders), and XLA's CPU
    backend does the same for the instruction set it targets (--xla_cpu_max_isa). Exact equality
    would test the CPU, not our code; a few ulps is still far tighter than any real bug (a wrong
    formula or a float64/float32 mix-up is off by hundreds of ulps or more). Comparisons of our
    code with itself (resume, export round trips, determinism) stay exact and do not use this.
    NaNs must sit at the same places; infinities must be equal.
    """
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape, f"shape {ours.shape} != {ref.shape}. {err_msg}"
    nan_ours, nan_ref = np.isnan(ours), np.isnan(ref)
    assert np.array_equal(nan_ours, nan_ref), f"NaNs at different places. {err_msg}"
    dist = np.where(nan_ours, 0, ulp_distance_f32(ours, ref))
    if dist.size and dist.max() > ulps:
        worst = np.unravel_index(np.argmax(dist), dist.shape)
        raise AssertionError(
            f"{int((dist > ulps).sum())} of {dist.size} float32 values differ by more than {ulps} ulps; "
            f"worst {int(dist.max())} ulps at {worst}: {ours[worst]!r} vs {ref[worst]!r}. {err_msg}"
        )


def _perturb(*modules) -> None:
    """Torch's default init leaves norms at identity and biases near zero; perturb every tensor so
    that a swapped scale/bias or a wrong transpose cannot hide."""
    import torch

    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.add_(0.05 * torch.randn_like(p))


def torch_pipeline(preset: str = "tiny", prediction_type: str = "epsilon", seed: int = 0, **components):
    """A diffusers StableDiffusionPipeline with random weights and our preset's architecture
    (``components``, e.g. ``vae={...}``, replace the preset's configs)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from safe_jax.io import presets
    from safe_jax.models import clip_text
    from safe_jax.models.unet import UNetConfig
    from safe_jax.models.vae import VAEConfig
    from safe_jax.text import tokenizer

    spec = dict(presets.preset(preset), **components)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(UNetConfig.from_diffusers(spec["unet"]).to_diffusers())
    vae = AutoencoderKL.from_config(VAEConfig.from_diffusers(spec["vae"]).to_diffusers())
    text = CLIPTextModel(CLIPTextConfig(**clip_text.preset(spec["text_encoder"]).to_hf()))
    _perturb(unet, vae, text)
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


def torch_xl_pipeline(preset: str = "tiny-xl", seed: int = 0, scheduler: str = "euler"):
    """A diffusers StableDiffusionXLPipeline with random weights and our SDXL preset's architecture,
    every tensor perturbed as in ``torch_pipeline``; ``scheduler`` "euler" (the SDXL default) or "ddim"."""
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from safe_jax.io import presets
    from safe_jax.models import clip_text
    from safe_jax.models.unet import UNetConfig
    from safe_jax.models.vae import VAEConfig
    from safe_jax.text import tokenizer

    spec = presets.preset(preset)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(UNetConfig.from_diffusers(spec["unet"]).to_diffusers())
    vae = AutoencoderKL.from_config(VAEConfig.from_diffusers(spec["vae"]).to_diffusers())
    text = CLIPTextModel(CLIPTextConfig(**clip_text.preset(spec["text_encoder"]).to_hf()))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip_text.preset(spec["text_encoder_2"]).to_hf()))
    _perturb(unet, vae, text, text_2)
    cls = {"euler": EulerDiscreteScheduler, "ddim": DDIMScheduler}[scheduler]
    return StableDiffusionXLPipeline(
        unet=unet.eval(), vae=vae.eval(), text_encoder=text.eval(), text_encoder_2=text_2.eval(),
        tokenizer=tokenizer.tiny_tokenizer(), tokenizer_2=tokenizer.tiny_tokenizer(pad_token="!"),
        scheduler=cls.from_config(spec["scheduler"]), force_zeros_for_empty_prompt=True,
    )


@pytest.fixture(scope="session")
def tiny_xl_folder(tmp_path_factory):
    """A tiny SDXL diffusers folder written by diffusers itself, and its pipeline."""
    pipe = torch_xl_pipeline("tiny-xl")
    folder = tmp_path_factory.mktemp("tiny_xl") / "pipe"
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder, pipe
