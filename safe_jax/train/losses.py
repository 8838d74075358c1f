"""SAFE's two training losses, as pure functions the train step composes.

- ``denoising_loss``: ε- or v-prediction MSE on the subject-weighted conditioning, with optional
  min-SNR weighting and conditioning dropout (for classifier-free guidance).
- ``refl_loss``: ReFL as ImageReward implements it: a 40-step DDIM rollout from noise to a random
  step j in [30, 39] without gradient (a lax loop under stop_gradient), one UNet call with gradient
  that predicts x̂0, VAE decode, reward, ``mean(relu(λ - r)) · grad_scale``.

Models enter as apply functions, so the same code serves full fine-tuning and LoRA (the caller
merges LoRA weights before calling), any reward, and any sharding.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from safe_jax.sampling import schedulers

UNetFn = Callable[[Any, jax.Array, jax.Array, Any], jax.Array]  # (params, x NHWC, t [B], conditioning) -> out
DecodeFn = Callable[[jax.Array], jax.Array]  # latents (already / scaling_factor) -> images in [-1, 1]
RewardFn = Callable[[jax.Array, dict], jax.Array]  # (images [B,H,W,3] in [0,1], batch) -> [B]


def drop_conditioning(context: Any, empty: Any, rate: float, key: jax.Array) -> Any:
    """Replace each sample's conditioning by the empty prompt's with probability ``rate``.

    SDXL's conditioning is a dict: the text parts (``empty``'s keys: the sequence and the pooled
    embedding) are dropped together, the micro-conditioning ``time_ids`` kept, as diffusers' SDXL
    training script does when it swaps a caption for ""."""
    if rate <= 0:
        return context
    if not isinstance(context, dict):
        drop = jax.random.bernoulli(key, rate, (context.shape[0], 1, 1))
        return jnp.where(drop, jnp.broadcast_to(empty, context.shape), context)
    b = next(iter(context.values())).shape[0]
    drop = jax.random.bernoulli(key, rate, (b,))
    swap = lambda c, e: jnp.where(drop.reshape((b,) + (1,) * (c.ndim - 1)), jnp.broadcast_to(e, c.shape), c)
    return {k: swap(v, empty[k]) if k in empty else v for k, v in context.items()}


def denoising_loss(
    unet: UNetFn,
    unet_params: Any,
    latents: jax.Array,
    context: jax.Array,
    key: jax.Array,
    schedule: schedulers.ScheduleConfig,
    min_snr_gamma: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean over the batch of the per-sample MSE to the schedule's target (ε or v)."""
    k_t, k_noise = jax.random.split(key)
    b = latents.shape[0]
    t = jax.random.randint(k_t, (b,), 0, schedule.num_train_timesteps)
    noise = jax.random.normal(k_noise, latents.shape, jnp.float32)
    noisy = schedulers.add_noise(schedule, latents, noise, t)
    target = schedulers.training_target(schedule, latents, noise, t)
    pred = unet(unet_params, noisy, t, context).astype(jnp.float32)
    per_sample = jnp.mean((pred - target) ** 2, axis=tuple(range(1, latents.ndim)))
    if min_snr_gamma:
        snr = schedulers.snr(schedule, t)
        clipped = jnp.minimum(snr, min_snr_gamma)
        # Hang et al. 2023: ε-targets weigh by min(snr, γ)/snr, v-targets by min(snr, γ)/(snr + 1).
        weight = clipped / (snr + 1.0) if schedule.prediction_type == "v_prediction" else clipped / snr
        per_sample = per_sample * weight
    return jnp.mean(per_sample), {"denoising_loss": jnp.mean(per_sample)}


def refl_loss(
    unet: UNetFn,
    unet_params: Any,
    decode: DecodeFn,
    reward: RewardFn,
    context: jax.Array,
    batch: dict,
    key: jax.Array,
    schedule: schedulers.ScheduleConfig,
    latent_shape: tuple[int, ...],
    scaling_factor: float,
    num_steps: int = 40,
    step_range: tuple[int, int] = (30, 39),
    lam: float = 2.0,
    grad_scale: float = 1e-3,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """ReFL loss; gradients reach ``unet_params`` only through the final UNet call.

    ``latent_shape`` is [B, h, w, C]; ``step_range`` is inclusive, as ImageReward's
    ``randint(30, 39)`` over a ``num_steps`` schedule with leading spacing.
    """
    leading = dataclasses.replace(schedule, timestep_spacing="leading")
    sampler = schedulers.make_sampler("ddim", leading, num_steps)
    k_noise, k_step = jax.random.split(key)
    j = jax.random.randint(k_step, (), step_range[0], step_range[1] + 1)
    frozen = jax.lax.stop_gradient(unet_params)
    x = jax.random.normal(k_noise, latent_shape, jnp.float32) * sampler.init_noise_sigma
    b = latent_shape[0]

    def rollout(i, x):
        t = jnp.broadcast_to(sampler.timestep(i), (b,))
        out = unet(frozen, x, t, context).astype(jnp.float32)
        return sampler.step(sampler.init_state(x), out, i, x)[0]

    x = jax.lax.stop_gradient(jax.lax.fori_loop(0, j, rollout, x))
    t = jnp.broadcast_to(sampler.timestep(j), (b,)).astype(jnp.int32)
    out = unet(unet_params, x, t, context).astype(jnp.float32)
    alpha_bar = jnp.asarray(schedulers.alphas_cumprod(schedule))[t][:, None, None, None]
    if schedule.prediction_type == "v_prediction":
        x0 = jnp.sqrt(alpha_bar) * x - jnp.sqrt(1 - alpha_bar) * out
    else:
        x0 = (x - jnp.sqrt(1 - alpha_bar) * out) / jnp.sqrt(alpha_bar)
    images = jnp.clip(decode(x0 / scaling_factor).astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
    r = reward(images, batch)
    loss = jnp.mean(jax.nn.relu(lam - r)) * grad_scale
    return loss, {"refl_loss": loss, "reward": jnp.mean(r), "refl_step": j.astype(jnp.float32)}
