"""Presets: names that stand for a model without a folder of one's own.

Architecture presets (random weights, for init or shape checks): ``sd15``, ``sd21`` and
``sd21-base`` are the published diffusers configs of Stable Diffusion 1.5, 2.1 (768,
v-prediction) and 2.1-base (512, epsilon); ``tiny`` is ours, the same kind of network at toy width,
so the whole pipeline runs in seconds on a CPU. ``sdxl`` is Stable Diffusion XL base 1.0's
architecture (UNet 2.567B parameters, two text encoders), ``tiny-xl`` its toy-width twin.

Shipped presets (trained weights inside the package, ``safe_jax/weights/``): the synthetic news
world's models, trained from scratch by ``make world`` and copied in by ``launch/ship_world.py``.
``tiny-anchor`` is a diffusers Stable Diffusion folder, ``tiny-anchor-reward`` the CLIPModel whose
text tower is its text encoder (SAFE's DFE reward), ``tiny-anchor-judge`` a separate CLIPModel
for evaluation only. They are real folders, so every loader reads them like any checkpoint:
``resolve`` turns the name into the path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safe_jax.errors import SafeJaxError

_SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")

_SD_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
               norm_num_groups=32, sample_size=512, scaling_factor=0.18215)

_SD15_UNET = dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=768,
                  attention_head_dim=8, sample_size=64,
                  down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                  up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)

_SD21_UNET = dict(_SD15_UNET, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                  use_linear_projection=True)

PRESETS: dict[str, dict[str, Any]] = {
    "sd15": dict(unet=_SD15_UNET, vae=_SD_VAE, text_encoder="sd15",
                 scheduler=dict(_SD_SCHEDULE, _class_name="PNDMScheduler", skip_prk_steps=True)),
    "sd21": dict(unet=dict(_SD21_UNET, sample_size=96, upcast_attention=True), vae=dict(_SD_VAE, sample_size=768),
                 text_encoder="sd21",
                 scheduler=dict(_SD_SCHEDULE, _class_name="DDIMScheduler", prediction_type="v_prediction")),
    "sd21-base": dict(unet=_SD21_UNET, vae=_SD_VAE, text_encoder="sd21",
                      scheduler=dict(_SD_SCHEDULE, _class_name="PNDMScheduler", skip_prk_steps=True)),
    "tiny": dict(
        unet=dict(block_out_channels=[32, 64], layers_per_block=2, cross_attention_dim=32, attention_head_dim=[2, 4],
                  norm_num_groups=8, sample_size=32,
                  down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"]),
        vae=dict(block_out_channels=[16, 32], layers_per_block=1, latent_channels=4, norm_num_groups=8,
                 sample_size=64, scaling_factor=0.18215),
        text_encoder="tiny",
        scheduler=dict(_SD_SCHEDULE, _class_name="DDIMScheduler"),
    ),
}


# stabilityai/stable-diffusion-xl-base-1.0's unet/, vae/ and scheduler/ configs.
_SDXL_UNET = dict(block_out_channels=[320, 640, 1280], layers_per_block=2, cross_attention_dim=2048,
                  attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10], sample_size=128,
                  down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                  use_linear_projection=True, upcast_attention=None, addition_embed_type="text_time",
                  addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
_SDXL_SCHEDULE = dict(_SD_SCHEDULE, _class_name="EulerDiscreteScheduler", interpolation_type="linear",
                      use_karras_sigmas=False, prediction_type="epsilon", sample_max_value=1.0, skip_prk_steps=True)

PRESETS.update({
    "sdxl": dict(unet=_SDXL_UNET, vae=dict(_SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
                 text_encoder="sdxl", text_encoder_2="sdxl-2", scheduler=_SDXL_SCHEDULE),
    # The same kind of network at toy width (as diffusers' own SDXL tests build one): a first
    # block without attention, two transformer layers in the second, 32 + 48 text channels.
    "tiny-xl": dict(
        unet=dict(block_out_channels=[32, 64], layers_per_block=2, cross_attention_dim=80, attention_head_dim=[2, 4],
                  transformer_layers_per_block=[1, 2], norm_num_groups=8, sample_size=32,
                  down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], use_linear_projection=True,
                  addition_embed_type="text_time", addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=24 + 6 * 8),
        vae=dict(block_out_channels=[16, 32], layers_per_block=1, latent_channels=4, norm_num_groups=8,
                 sample_size=64, scaling_factor=0.13025, force_upcast=True),
        text_encoder="tiny", text_encoder_2="tiny-2",
        scheduler=dict(_SDXL_SCHEDULE),
    ),
})


def preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise SafeJaxError(f"unknown preset {name!r} and no such folder (presets: {', '.join(PRESETS)})")
    return PRESETS[name]


WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
SHIPPED: dict[str, str] = {
    "tiny-anchor": "a diffusers Stable Diffusion folder of the synthetic news world (64², trained from scratch)",
    "tiny-anchor-reward": "its reward CLIPModel (the text encoder's own CLIP; SAFE's DFE reward)",
    "tiny-anchor-judge": "the world's judge CLIPModel (evaluation only: another size, seed and data stream)",
}


def resolve(name_or_path: str | Path) -> str | Path:
    """The folder of a shipped preset, else ``name_or_path`` unchanged (a folder or an architecture
    preset, which the caller judges)."""
    name = str(name_or_path)
    if name not in SHIPPED:
        return name_or_path
    folder = WEIGHTS / name
    if not (folder / ("model_index.json" if name == "tiny-anchor" else "config.json")).is_file():
        raise SafeJaxError(f"preset {name!r} is not in this installation ({folder} is missing or incomplete): "
                           "rebuild it with `make world`")
    return str(folder)
