"""The world's Stable Diffusion: a UNet trained from scratch on the trained VAE and the reward
CLIP's text tower, saved as a diffusers folder.

The folder is assembled from parts that already exist: the ``world_vae`` run's AutoencoderKL, the
``world_clip_reward`` run's text tower (``text_model.*`` of its CLIPModel, as a transformers
``CLIPTextModel``) and tokenizer, Stable Diffusion's DDIM schedule, and a new UNet whose
cross-attention width is the text tower's. Training is SAFE's own denoising step
(``safe_jax.train.step``: ε-MSE, frozen text encoder and VAE, conditioning dropout for
classifier-free guidance) with plain captions, so the base model knows nothing of subject
weighting: that is what SAFE adds later.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from safe_jax.errors import SafeJaxError
from safe_jax.io import folders, presets
from safe_jax.io.clip_folder import load_clip
from safe_jax.io.convert import torch_to_flax
from safe_jax.models.clip_text import CLIPTextModel
from safe_jax.models.unet import UNet2DConditionModel, UNetConfig
from safe_jax.models.vae import AutoencoderKL, VAEConfig
from safe_jax.pretrain import data
from safe_jax.pretrain.init import init_for_training
from safe_jax.sampling import schedulers
from safe_jax.sampling.stable_diffusion import StableDiffusion
from safe_jax.train import step as train_step
from safe_jax.train.rewards import clip_tokenizer

EVAL_TIMESTEPS = (100, 300, 500, 700, 900)
# guided-diffusion's zero_module places: resnets' second conv, transformers' output projection, the
# UNet's output (its first prediction is 0).
ZERO = re.compile(r"(resnets_\d+/conv2|attentions_\d+/proj_out)/kernel$|^conv_out/kernel$")


def unet_config(config: Any, cross_attention_dim: int, sample_size: int) -> UNetConfig:
    m = config.model
    n = len(m.block_out_channels)
    return UNetConfig.from_diffusers(dict(
        block_out_channels=list(m.block_out_channels), layers_per_block=m.layers_per_block,
        attention_head_dim=list(m.attention_heads), norm_num_groups=m.norm_num_groups,
        cross_attention_dim=cross_attention_dim, sample_size=sample_size,
        down_block_types=["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1)), "config.model")


def load_vae(folder: str | Path) -> tuple[AutoencoderKL, Any]:
    folder = Path(folder)
    model = AutoencoderKL(VAEConfig.from_diffusers(folders.read_json(folder / "config.json"),
                                                   str(folder / "config.json")))
    c = model.config
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, c.downscale, c.downscale, c.in_channels)))
    return model, torch_to_flax(folders.load_state_dict(folder), abstract["params"], what=f"vae {folder}")


def assemble_pipeline(config: Any) -> tuple[StableDiffusion, dict]:
    """The world's pipeline with a random UNet: (pipe, {"vae", "text_encoder"} parameters)."""
    vae, vae_params = load_vae(config.vae)
    clip, clip_params = load_clip(config.text)
    tokenizer = clip_tokenizer(config.text)
    text = clip.config.text
    if tokenizer.model_max_length != text.max_position_embeddings:
        raise SafeJaxError(f"config.text: {config.text}'s tokenizer pads to {tokenizer.model_max_length} tokens but "
                           f"its text tower reads {text.max_position_embeddings}")
    size = config.data.image_size
    if size % vae.config.downscale:
        raise SafeJaxError(f"config.data.image_size ({size}) must be a multiple of the VAE's downscale "
                           f"({vae.config.downscale})")
    scheduler = dict(presets.preset("tiny")["scheduler"])  # Stable Diffusion's schedule, DDIM
    pipe = StableDiffusion(
        unet=UNet2DConditionModel(unet_config(config, text.hidden_size, size // vae.config.downscale)),
        vae=vae, text_encoder=CLIPTextModel(text), tokenizer=tokenizer,
        schedule=schedulers.ScheduleConfig.from_diffusers(scheduler), scheduler_config=scheduler)
    return pipe, {"vae": vae_params, "text_encoder": {"text_model": clip_params["text_model"]}}


class UNetTask:
    curves = ("loss", "eval_mse")

    def __init__(self, config: Any):
        self.config = config
        self.world = data.world(config.data.image_size)
        self.pipe, self.parts = assemble_pipeline(config)
        self._held_out = None
        # What the compiled step holds as constants besides the config: the VAE's and text tower's configs.
        self.static_key = repr((self.pipe.vae.config, self.pipe.text_encoder.config))

    def init(self, seed: int) -> tuple[Any, dict]:
        unet = init_for_training(self.pipe.abstract_params()["unet"], seed, zero=ZERO)
        return unet, {**self.parts, "unet": {}, "reward": {}}

    def assemble(self, examples: list[data.Example], rng: np.random.Generator) -> dict:
        ids = self.pipe.tokenize([e.caption for e in examples])
        return {"images": data.to_unit_range(data.images_uint8(examples)), "input_ids": ids,
                "token_weights": np.ones(ids.shape, np.float32)}

    def batches(self) -> data.StepBatches:
        d = self.config.data
        return data.StepBatches(self.world, d.seed, d.batch_size, self.assemble, d.prefetch)

    def make_step(self, tx, ema_decay):
        cfg = train_step.StepConfig(mode="full", loss="denoising", cond_dropout=self.config.loss.cond_dropout,
                                    min_snr_gamma=self.config.loss.min_snr_gamma, ema_decay=ema_decay)
        model = train_step.DiffusionModel.from_modules(self.pipe.unet, self.pipe.vae, self.pipe.schedule)
        return train_step.make_train_step(model, self.pipe.conditioner, cfg, tx)

    # ------------------------------------------------------------------ held-out
    def held_out(self) -> list[data.Example]:
        if self._held_out is None:
            self._held_out = data.held_out(self.world, self.config.eval_examples)
        return self._held_out

    def evaluate(self, params: Any, frozen: dict) -> dict[str, float]:
        """ε-MSE on held-out pictures at fixed timesteps and noise: comparable from run to run."""
        examples = self.held_out()
        images = jnp.asarray(data.to_unit_range(data.images_uint8(examples)))
        ids = jnp.asarray(self.pipe.tokenize([e.caption for e in examples]))
        p = self.pipe
        per_t = [float(_held_out_mse(p.unet, p.vae, p.text_encoder, p.schedule, params, frozen, images, ids,
                                     jnp.int32(t))) for t in EVAL_TIMESTEPS]
        return {"mse": float(np.mean(per_t)), **{f"mse_t{t}": v for t, v in zip(EVAL_TIMESTEPS, per_t)}}

    def samples(self, params: Any, frozen: dict) -> np.ndarray | None:
        """Held-out pictures (top) and what the model draws for their captions (bottom)."""
        s = self.config.sample
        if not s.count:
            return None
        examples = self.held_out()[:s.count]
        drawn = self.pipe.generate({**self.parts, "unet": params}, [e.caption for e in examples],
                                   num_steps=s.steps, guidance_scale=s.guidance, scheduler=s.scheduler, seed=0)
        real = data.images_uint8(examples)
        return np.concatenate([np.concatenate(list(real), 1), np.concatenate(list(drawn), 1)], 0)

    def export(self, params: Any, frozen: dict, out_dir: Path) -> dict:
        self.pipe.save_pretrained({**self.parts, "unet": params}, out_dir, dtype=self.config.export.dtype)
        return self.evaluate(params, frozen)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _held_out_mse(unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                  schedule: schedulers.ScheduleConfig, unet_params: Any, frozen: dict, images: jax.Array,
                  ids: jax.Array, t: jax.Array) -> jax.Array:
    mean, _ = vae.apply({"params": frozen["vae"]}, images, method=AutoencoderKL.encode)
    latents = mean * vae.config.scaling_factor
    context = text_encoder.apply({"params": frozen["text_encoder"]}, ids)["encoded"]
    noise = jax.random.normal(jax.random.fold_in(jax.random.key(0), t), latents.shape)
    steps = jnp.full((latents.shape[0],), t)
    noisy = schedulers.add_noise(schedule, latents, noise, steps)
    target = schedulers.training_target(schedule, latents, noise, steps)
    pred = unet.apply({"params": unet_params}, noisy, steps, context)
    return jnp.mean((pred - target) ** 2)
