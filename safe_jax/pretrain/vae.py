"""The world's VAE: our AutoencoderKL trained from scratch, exported as a diffusers folder.

Loss = L1 reconstruction + w_g · L1 of the image gradients (finite differences: a cheap stand-in
for a perceptual loss that keeps the world's edges — figures, silhouettes — sharp) + β · KL to
N(0, 1), per element. β is small, as in Stable Diffusion's VAE: the KL only keeps the posterior
from collapsing to points and the latent scale in check. At export the ``scaling_factor`` is set
as Stable Diffusion's was: 1 / the standard deviation of posterior samples of held-out images, so
the diffusion model sees unit-variance latents.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from safe_jax.io import folders
from safe_jax.io.convert import flax_to_torch
from safe_jax.models.vae import AutoencoderKL, VAEConfig, sample_posterior
from safe_jax.pretrain import data
from safe_jax.pretrain.init import init_for_training


def vae_config(config: Any) -> VAEConfig:
    m = config.model
    n = len(m.block_out_channels)
    return VAEConfig.from_diffusers(dict(
        block_out_channels=list(m.block_out_channels), layers_per_block=m.layers_per_block,
        latent_channels=m.latent_channels, norm_num_groups=m.norm_num_groups, sample_size=config.data.image_size,
        down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n), "config.model")


def _gradients(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return x[:, 1:] - x[:, :-1], x[:, :, 1:] - x[:, :, :-1]


class VAETask:
    curves = ("loss", "l1", "kl", "eval_psnr")

    def __init__(self, config: Any):
        self.config = config
        self.world = data.world(config.data.image_size)
        self.model = AutoencoderKL(vae_config(config))
        self._held_out = None

    def init(self, seed: int) -> tuple[Any, dict]:
        size = self.config.data.image_size
        abstract = jax.eval_shape(self.model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]
        return init_for_training(abstract, seed), {}

    def batches(self) -> data.StepBatches:
        d = self.config.data
        return data.StepBatches(self.world, d.seed, d.batch_size,
                                lambda examples, rng: {"images": data.to_unit_range(data.images_uint8(examples))},
                                d.prefetch)

    def loss(self, params: Any, frozen: dict, batch: dict, key: jax.Array):
        x = batch["images"]
        mean, logvar = self.model.apply({"params": params}, x, method=AutoencoderKL.encode)
        recon = self.model.apply({"params": params}, sample_posterior(mean, logvar, key), method=AutoencoderKL.decode)
        l1 = jnp.mean(jnp.abs(recon - x))
        grad = sum(jnp.mean(jnp.abs(a - b)) for a, b in zip(_gradients(recon), _gradients(x)))
        kl = 0.5 * jnp.mean(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar)
        w = self.config.loss
        loss = l1 + w.gradient_weight * grad + w.kl_weight * kl
        return loss, {"l1": l1, "gradient_l1": grad, "kl": kl, "mse": jnp.mean((recon - x) ** 2),
                      "latent_std": jnp.std(mean)}

    def make_step(self, tx, ema_decay):
        from safe_jax.pretrain.loop import make_step

        return make_step(self.loss, tx, ema_decay)

    # ------------------------------------------------------------------ held-out
    def held_out_images(self) -> np.ndarray:
        if self._held_out is None:
            self._held_out = data.to_unit_range(data.images_uint8(data.held_out(self.world, self.config.eval_examples)))
        return self._held_out

    def reconstruct(self, params: Any, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(posterior mean, log-variance, reconstruction through the mean) of images in [-1, 1]."""
        return tuple(np.asarray(a) for a in _reconstruct(self.model, params, jnp.asarray(images)))

    def evaluate(self, params: Any, frozen: dict) -> dict[str, float]:
        x = self.held_out_images()
        mean, _, recon = self.reconstruct(params, x)
        mse = float(np.mean((np.clip(recon, -1, 1) - x) ** 2))
        return {"psnr": 10 * np.log10(4.0 / max(mse, 1e-12)), "l1": float(np.mean(np.abs(recon - x))),
                "latent_std": float(np.std(mean))}

    def samples(self, params: Any, frozen: dict) -> np.ndarray:
        """Held-out pictures (top) over their reconstructions (bottom)."""
        x = self.held_out_images()[:8]
        recon = self.reconstruct(params, x)[2]
        to_uint8 = lambda a: np.round((np.clip(a, -1, 1) + 1) * 127.5).astype(np.uint8)
        return np.concatenate([np.concatenate(list(to_uint8(x)), 1), np.concatenate(list(to_uint8(recon)), 1)], 0)

    def scaling_factor(self, params: Any) -> float:
        """1 / std of posterior samples of the held-out images (fixed noise), as SD set 0.18215."""
        mean, logvar, _ = self.reconstruct(params, self.held_out_images())
        noise = np.random.default_rng(0).standard_normal(mean.shape)
        return float(1.0 / np.std(mean + np.exp(0.5 * logvar.astype(np.float64)) * noise))

    def export(self, params: Any, frozen: dict, out_dir: Path) -> dict:
        factor = self.scaling_factor(params)
        write_vae(self.model.config, params, out_dir, factor, self.config.export.dtype)
        return {"scaling_factor": factor, **self.evaluate(params, frozen)}


def write_vae(config: VAEConfig, params: Any, out_dir: Path, scaling_factor: float, dtype: str) -> Path:
    """A diffusers ``AutoencoderKL`` folder (config.json with ``scaling_factor``, safetensors)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folders.write_json(out_dir / "config.json",
                       dataclasses.replace(config, scaling_factor=float(scaling_factor)).to_diffusers())
    folders.save_state_dict(flax_to_torch(params), out_dir / "diffusion_pytorch_model.safetensors", dtype)
    return out_dir


@functools.partial(jax.jit, static_argnums=0)
def _reconstruct(model: AutoencoderKL, params: Any, images: jax.Array):
    mean, logvar = model.apply({"params": params}, images, method=AutoencoderKL.encode)
    return mean, logvar, model.apply({"params": params}, mean, method=AutoencoderKL.decode)
