"""One SAFE training step: subject-weighted conditioning → UNet → denoising/ReFL loss → AdamW update.

The step is a pure function of (state, frozen, batch), built once by ``make_train_step`` and
compiled ahead of time by ``compile_train_step`` with explicit in/out shardings and a donated
state (what pjit was). ``state.params`` is what is trained: the UNet's parameters, or a LoRA tree
(``safe_jax.train.lora``) merged into the frozen UNet inside the step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from safe_jax import sharding
from safe_jax.errors import SafeJaxError
from safe_jax.models.vae import AutoencoderKL, sample_posterior
from safe_jax.sampling.schedulers import ScheduleConfig
from safe_jax.text.conditioner import SubjectSettings, TextConditioner, with_time_ids
from safe_jax.train import lora, losses


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # trainable: UNet params (full) or LoRA params
    opt_state: Any
    ema: Any  # EMA of params (same tree), or None
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Everything static about the step (a change means a new compile)."""

    mode: str = "lora"  # "full" | "lora"
    lora_scale: float = 1.0
    loss: str = "both"  # "denoising" | "refl" | "both"
    mix: str = "alternate"  # with "both": "alternate" (ReFL on odd steps) | "weighted"
    refl_weight: float = 1.0  # with mix="weighted": loss = denoising + refl_weight · refl
    subjects: SubjectSettings = SubjectSettings()  # the weighting; the data pipeline applied the weights
    cond_dropout: float = 0.1
    min_snr_gamma: float | None = None
    refl_steps: int = 40
    refl_step_range: tuple[int, int] = (30, 39)
    refl_lambda: float = 2.0
    refl_grad_scale: float = 1e-3
    ema_decay: float | None = 0.999
    nan_policy: str = "skip"  # "skip" the update | "halt" (the host loop raises)

    # config.loss keys whose StepConfig field has another name or shape
    _LOSS_FIELDS = {"kind": "loss", "refl_step_min": None, "refl_step_max": None}

    @classmethod
    def from_config(cls, config: Any, lora_scale: float = 1.0) -> "StepConfig":
        """From a training config (``launch/configs/base.py``): its ``loss`` and ``subjects``
        sections as they are, plus the mode, EMA and NaN policy."""
        loss = dict(config.loss)
        fields = {cls._LOSS_FIELDS.get(k, k): v for k, v in loss.items() if cls._LOSS_FIELDS.get(k, k)}
        fields["refl_step_range"] = (loss["refl_step_min"], loss["refl_step_max"])
        return cls(mode=config.mode, lora_scale=lora_scale, subjects=SubjectSettings(**config.subjects),
                   ema_decay=config.optim.ema_decay, nan_policy=config.nan_policy, **fields)

    def __post_init__(self):
        checks = {"mode": ("full", "lora"), "loss": ("denoising", "refl", "both"),
                  "mix": ("alternate", "weighted"), "nan_policy": ("skip", "halt")}
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise SafeJaxError(f"train: {name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")


def lr_schedule(lr: float = 1e-4, warmup_steps: int = 0, total_steps: int = 1000,
                schedule: str = "cosine") -> optax.Schedule:
    """Learning rate per optimizer update: linear warmup from 0, then cosine decay to 0 or constant."""
    if schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup_steps, 0), max(total_steps, warmup_steps + 1))
    if schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), optax.constant_schedule(lr)],
                                    [warmup_steps]) if warmup_steps else optax.constant_schedule(lr)
    raise SafeJaxError(f"train: schedule must be cosine or constant, got {schedule!r}")


def make_optimizer(lr: float = 1e-4, warmup_steps: int = 0, total_steps: int = 1000, schedule: str = "cosine",
                   weight_decay: float = 1e-2, clip_norm: float | None = 1.0, accumulate: int = 1
                   ) -> optax.GradientTransformation:
    """AdamW on ``lr_schedule``, global-norm clipping, accumulation over ``accumulate`` calls."""
    lr_fn = lr_schedule(lr, warmup_steps, total_steps, schedule)
    chain = ([optax.clip_by_global_norm(clip_norm)] if clip_norm else []) + [
        optax.adamw(lr_fn, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)]
    tx = optax.chain(*chain)
    return optax.MultiSteps(tx, accumulate) if accumulate > 1 else tx


def init_state(params: Any, tx: optax.GradientTransformation, seed: int = 0, ema: bool = True) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema=jax.tree.map(jnp.copy, params) if ema else None, rng=jax.random.key_data(jax.random.key(seed)))


def _placeholder(x: jax.ShapeDtypeStruct) -> jax.Array:
    return jnp.full(x.shape, jnp.nan if jnp.issubdtype(x.dtype, jnp.floating) else -1, x.dtype)


@dataclasses.dataclass(frozen=True)
class DiffusionModel:
    """What a training step needs of a latent diffusion model: pure apply functions of explicit
    parameters, the noise schedule and the latent scale; not the sampler (``StableDiffusion``)."""

    unet: Any      # (unet_params, latents, timesteps, context) -> ε or v prediction
    encode: Any    # (vae_params, images in [-1, 1]) -> (mean, logvar) of the latent posterior
    decode: Any    # (vae_params, latents / scaling_factor) -> images in [-1, 1]
    schedule: ScheduleConfig
    scaling_factor: float

    @classmethod
    def from_modules(cls, unet: Any, vae: AutoencoderKL, schedule: ScheduleConfig) -> "DiffusionModel":
        return cls(unet=lambda p, x, t, c: unet.apply({"params": p}, x, t, c),
                   encode=lambda p, x: vae.apply({"params": p}, x, method=AutoencoderKL.encode),
                   decode=lambda p, z: vae.apply({"params": p}, z, method=AutoencoderKL.decode),
                   schedule=schedule, scaling_factor=vae.config.scaling_factor)


def step_conditioning(conditioner: TextConditioner, cfg: StepConfig, text_params: Any, batch: dict,
                      z_empty: Any = None) -> Any:
    """The subject-weighted context [B, 77, C] a step trains on: ``cfg.subjects``' weighting of the
    batch's token weights, with as many Compel blend passes as the settings allow (w < 1). For
    SDXL, the conditioning dict, completed by the batch's ``time_ids`` (each image's own size and crop)."""
    context = conditioner(text_params, batch["input_ids"], batch["token_weights"], cfg.subjects.weighting,
                          cfg.subjects.training_downweighted, z_empty=z_empty)
    return with_time_ids(context, batch["time_ids"]) if isinstance(context, dict) else context


def make_train_step(model: DiffusionModel, conditioner: TextConditioner, cfg: StepConfig,
                    tx: optax.GradientTransformation, reward=None):
    """``step(state, frozen, batch) -> (state, metrics)``.

    ``frozen``: {"text_encoder" (``conditioner.text_params``: for SDXL both encoders), "vae",
    "unet" (the base, for LoRA), "reward"} parameter trees.
    ``batch``: "input_ids" and "token_weights" [B, 77] (subject weights), and either "latents"
    [B, h, w, 4] (precomputed, already scaled) or "images" [B, H, W, 3] in [-1, 1]; for SDXL
    "time_ids" [B, 6]; ReFL rewards may read more keys (e.g. "gt_images" for DFE).
    """
    schedule, scaling = model.schedule, model.scaling_factor
    if cfg.loss != "denoising" and reward is None:
        raise SafeJaxError("train: a ReFL loss needs a reward")
    unet = model.unet

    def step(state: TrainState, frozen: dict, batch: dict):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        k_lat, k_drop, k_den, k_refl = jax.random.split(key, 4)
        decode = lambda z: model.decode(frozen["vae"], z)
        empty = conditioner.empty(frozen["text_encoder"])  # z∅ once: the weighting and the dropout share it
        context = jax.lax.stop_gradient(step_conditioning(conditioner, cfg, frozen["text_encoder"], batch, empty))
        if "latents" in batch:
            latents = batch["latents"]
        else:
            mean, logvar = model.encode(frozen["vae"], batch["images"])
            latents = jax.lax.stop_gradient(sample_posterior(mean, logvar, k_lat) * scaling)

        reward_batch = dict(batch)
        if "images" in batch and "gt_images" not in batch:  # DFE's image term: the ground truth in [0, 1]
            reward_batch["gt_images"] = batch["images"] / 2 + 0.5

        def denoising(unet_params):
            ctx = losses.drop_conditioning(context, empty, cfg.cond_dropout, k_drop)
            return losses.denoising_loss(unet, unet_params, latents, ctx, k_den, schedule, cfg.min_snr_gamma)

        def refl(unet_params):
            return losses.refl_loss(
                unet, unet_params, decode, lambda images, b: reward(frozen["reward"], images, b), context,
                reward_batch, k_refl, schedule, latents.shape, scaling, cfg.refl_steps, cfg.refl_step_range,
                cfg.refl_lambda, cfg.refl_grad_scale)

        def loss_fn(trainable):
            unet_params = lora.merge(frozen["unet"], trainable, cfg.lora_scale) if cfg.mode == "lora" else trainable
            if cfg.loss == "denoising":
                return denoising(unet_params)
            if cfg.loss == "refl":
                return refl(unet_params)
            if cfg.mix == "weighted":
                (den, m_den), (rl, m_refl) = denoising(unet_params), refl(unet_params)
                return den + cfg.refl_weight * rl, {**m_den, **m_refl}
            # alternate: ReFL on odd steps, denoising on even ones; only the chosen loss is computed.
            # Both branches report every metric, NaN for the one not computed this step.
            def only(fn, other):
                def branch(p):
                    total, m = fn(p)
                    return total, {**jax.tree.map(_placeholder, other), **m}
                return branch
            m_den = jax.eval_shape(denoising, unet_params)[1]
            m_refl = jax.eval_shape(refl, unet_params)[1]
            return jax.lax.cond(state.step % 2 == 1, only(refl, m_den), only(denoising, m_refl), unet_params)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return apply_gradients(state, loss, grads, metrics, tx, cfg.ema_decay)

    return step


def apply_gradients(state: TrainState, loss: jax.Array, grads: Any, metrics: dict, tx: optax.GradientTransformation,
                    ema_decay: float | None) -> tuple[TrainState, dict]:
    """The update every training step ends with (SAFE fine-tuning and pretraining alike): ``tx`` on
    ``grads``, the EMA, and ``loss``, ``grad_norm`` and ``finite`` added to ``metrics``. A non-finite
    loss or gradient leaves parameters, optimizer state and EMA as they were."""
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    ema = state.ema
    if ema is not None and ema_decay is not None:
        ema = keep(jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params), ema)
    metrics = {**metrics, "loss": loss, "grad_norm": grad_norm, "finite": finite}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema=ema, rng=state.rng), metrics


def compile_train_step(step_fn, state: TrainState, frozen: dict, batch: dict, mesh) -> Any:
    """Lower and compile once, with FSDP shardings for state and frozen trees and the batch split
    over (data, fsdp); the state is donated. Calling the result with other shapes is an error, so a
    run can never silently recompile."""
    state_sh = sharding.shardings_for(state, mesh)
    frozen_sh = sharding.shardings_for(frozen, mesh)
    batch_sh = jax.tree.map(lambda _: sharding.batch_sharding(mesh), batch)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    jitted = jax.jit(step_fn, in_shardings=(state_sh, frozen_sh, batch_sh),
                     out_shardings=(state_sh, replicated), donate_argnums=(0,))
    abstract = lambda tree, sh: jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
    return jitted.lower(abstract(state, state_sh), abstract(frozen, frozen_sh), abstract(batch, batch_sh)).compile()
