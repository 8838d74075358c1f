"""``StableDiffusion``: load, generate and save, in the style of diffusers' pipelines.

Modules and parameters are kept apart, as JAX wants: ``from_pretrained`` returns ``(pipe, params)``
and every method takes ``params`` explicitly, so training can hand in its own (sharded, updated)
trees. ``params`` is ``{"unet": ..., "vae": ..., "text_encoder": ...}``, plus ``"text_encoder_2"``
for Stable Diffusion XL, which the same class loads, samples, trains and saves: its second text
encoder, pooled embedding and micro-conditioning live in ``DualTextConditioner`` and in the UNet's
conditioning dict, so nothing downstream asks which model it has.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from safe_jax import sharding
from safe_jax.errors import SafeJaxError
from safe_jax.io import folders as io
from safe_jax.io import presets
from safe_jax.io.convert import flax_to_torch, torch_to_flax
from safe_jax.io.random_init import random_params
from safe_jax.models import clip_text
from safe_jax.models.attention_ops import AttentionImpl
from safe_jax.models.unet import UNet2DConditionModel, UNetConfig
from safe_jax.models.vae import AutoencoderKL, VAEConfig
from safe_jax.sampling import schedulers
from safe_jax.text import conditioner as conditioner_lib
from safe_jax.text import tokenizer as tok
from safe_jax.text.conditioner import DEFAULT_WEIGHT, DualTextConditioner, TextConditioner, with_time_ids

Params = dict[str, Any]
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
XL_COMPONENTS = COMPONENTS + ("text_encoder_2", "tokenizer_2")
# diffusers scheduler classes → our sampler of the same name, the default of ``generate``
_SAMPLER_OF_CLASS = {"DDIMScheduler": "ddim", "EulerDiscreteScheduler": "euler",
                     "EulerAncestralDiscreteScheduler": "euler_a", "DPMSolverMultistepScheduler": "dpm++2m"}


def default_compute_dtype() -> Any:
    """bf16 activations on accelerators, fp32 on CPU (where bf16 is slow and parity tests run)."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


@dataclasses.dataclass(frozen=True, eq=False)
class StableDiffusion:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: clip_text.CLIPTextModel
    tokenizer: Any
    schedule: schedulers.ScheduleConfig
    scheduler_config: dict  # as read from scheduler_config.json, written back unchanged on export
    # Stable Diffusion XL only: the second text encoder (CLIPTextModelWithProjection), its tokenizer,
    # and whether an absent negative prompt is the zero embedding (diffusers' pipeline setting).
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    force_zeros_for_empty_prompt: bool = False

    @property
    def is_xl(self) -> bool:
        return self.unet.config.addition_embed_type == "text_time"

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path_or_preset: str | Path,
        *,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        attention_impl: AttentionImpl = None,
        remat_policy: str | None = None,
        variant: str | None = None,
        seed: int = 0,
    ) -> tuple["StableDiffusion", Params]:
        """A local diffusers folder (``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``),
        a shipped preset (``tiny-anchor``: trained weights) or an architecture preset (random
        weights: ``tiny``, ``sd15``, ``sd21``, ``sd21-base``, ``tiny-xl``, ``sdxl``).

        ``dtype`` is the compute dtype (default: bf16 on GPU/TPU, fp32 on CPU); parameters are
        held in ``param_dtype``. ``variant`` picks e.g. ``diffusion_pytorch_model.fp16.safetensors``.
        """
        dtype = dtype or default_compute_dtype()
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        path_or_preset = presets.resolve(path_or_preset)
        path = Path(path_or_preset)
        if path.is_dir():
            return cls._from_folder(path, kw, attention_impl, remat_policy, variant)
        if str(path_or_preset) not in presets.PRESETS and (path.suffix or "/" in str(path_or_preset)):
            raise SafeJaxError(f"missing folder: {path} (nor is it a preset: {', '.join([*presets.PRESETS, 'tiny-anchor'])})")
        spec = presets.preset(str(path_or_preset))
        vae_cfg = VAEConfig.from_diffusers(spec["vae"])
        xl = {}
        if "text_encoder_2" in spec:
            xl = dict(text_encoder_2=clip_text.CLIPTextModelWithProjection(
                clip_text.preset(spec["text_encoder_2"]), attention_impl=attention_impl, **kw),
                tokenizer_2=tok.tiny_tokenizer(pad_token="!"), force_zeros_for_empty_prompt=True)
        pipe = cls(
            unet=UNet2DConditionModel(UNetConfig.from_diffusers(spec["unet"]), attention_impl, remat_policy, **kw),
            vae=AutoencoderKL(vae_cfg, attention_impl, **dict(kw, dtype=_vae_dtype(vae_cfg, dtype))),
            text_encoder=clip_text.CLIPTextModel(clip_text.preset(spec["text_encoder"]), attention_impl=attention_impl, **kw),
            tokenizer=tok.tiny_tokenizer(),
            schedule=schedulers.ScheduleConfig.from_diffusers(spec["scheduler"]),
            scheduler_config=dict(spec["scheduler"]),
            **xl,
        )
        return pipe, pipe.init_params(seed)

    @classmethod
    def _from_folder(cls, root: Path, kw, attention_impl, remat_policy, variant) -> tuple["StableDiffusion", Params]:
        index_path = root / "model_index.json"
        index = io.read_json(index_path)
        xl = index.get("_class_name") == "StableDiffusionXLPipeline" or "text_encoder_2" in index
        for name in XL_COMPONENTS if xl else COMPONENTS:
            if not isinstance(index.get(name), list) or None in index[name]:
                what = "Stable Diffusion XL" if xl else "Stable Diffusion"
                raise SafeJaxError(f"{index_path} lists no '{name}': not a {what} pipeline folder"
                                   + (" (SDXL refiner folders, with one text encoder, are not supported)"
                                      if xl and name == "text_encoder" else ""))
        config = lambda name: (io.read_json(root / name / "config.json"), str(root / name / "config.json"))
        unet_cfg = UNetConfig.from_diffusers(*config("unet"))
        vae_cfg = VAEConfig.from_diffusers(*config("vae"))
        text_cfg = clip_text.CLIPTextConfig.from_hf(*config("text_encoder"))
        scheduler_config = io.read_json(root / "scheduler" / "scheduler_config.json")
        extra = {}
        if xl:
            text_cfg_2 = clip_text.CLIPTextConfig.from_hf(*config("text_encoder_2"))
            zeros = index.get("force_zeros_for_empty_prompt", True)
            if not isinstance(zeros, bool):
                raise SafeJaxError(f"{index_path}: force_zeros_for_empty_prompt must be true or false, got {zeros!r}")
            extra = dict(text_encoder_2=clip_text.CLIPTextModelWithProjection(text_cfg_2, attention_impl=attention_impl, **kw),
                         tokenizer_2=tok.load_tokenizer(root / "tokenizer_2"), force_zeros_for_empty_prompt=zeros)
        pipe = cls(
            unet=UNet2DConditionModel(unet_cfg, attention_impl, remat_policy, **kw),
            vae=AutoencoderKL(vae_cfg, attention_impl, **dict(kw, dtype=_vae_dtype(vae_cfg, kw["dtype"]))),
            text_encoder=clip_text.CLIPTextModel(text_cfg, attention_impl=attention_impl, **kw),
            tokenizer=tok.load_tokenizer(root / "tokenizer"),
            schedule=schedulers.ScheduleConfig.from_diffusers(scheduler_config),
            scheduler_config=scheduler_config,
            **extra,
        )
        pipe.check_components(str(root))
        abstract = pipe.abstract_params()
        params = {
            "unet": torch_to_flax(io.load_state_dict(root / "unet", variant), abstract["unet"], what="unet"),
            "vae": torch_to_flax(io.load_state_dict(root / "vae", variant), abstract["vae"], what="vae"),
        }
        for name in ("text_encoder", "text_encoder_2") if xl else ("text_encoder",):
            module = getattr(pipe, name)
            text_state = io.load_state_dict(root / name, variant)
            params[name] = clip_text.from_hf_state_dict(text_state, module)
            # Remember how the encoder's keys were spelled (hub "text_model.…" or transformers 5's
            # unprefixed keys), so that save_pretrained writes them back the same way.
            spelled = dataclasses.replace(module.config, state_dict_prefix=clip_text.state_dict_prefix(text_state))
            pipe = dataclasses.replace(pipe, **{name: module.clone(config=spelled)})
        return pipe, params

    def check_components(self, source: str) -> None:
        """That the parts fit together: the UNet's cross-attention width is the text encoding's,
        and for SDXL the pooled width and the second tokenizer (CLIP's BPE again: only its padding
        may differ, since both encoders read one tokenisation, see ``DualTextConditioner``)."""
        u, t = self.unet.config, self.text_encoder.config
        if not self.is_xl:
            if self.text_encoder_2 is not None:
                raise SafeJaxError(f"{source}: a second text encoder, but the UNet takes no pooled text embedding "
                                   "(addition_embed_type is not 'text_time')")
            if u.cross_attention_dim != t.hidden_size:
                raise SafeJaxError(f"{source}: unet cross_attention_dim {u.cross_attention_dim} does not match "
                                   f"text_encoder hidden_size {t.hidden_size}")
            return
        if self.text_encoder_2 is None:
            raise SafeJaxError(f"{source}: the UNet is SDXL's (addition_embed_type 'text_time') but there is no text_encoder_2")
        t2 = self.text_encoder_2.config
        if u.cross_attention_dim != t.hidden_size + t2.hidden_size:
            raise SafeJaxError(f"{source}: unet cross_attention_dim {u.cross_attention_dim} is not text_encoder hidden_size "
                               f"{t.hidden_size} + text_encoder_2 hidden_size {t2.hidden_size}")
        if u.pooled_dim != t2.projection_dim:
            raise SafeJaxError(f"{source}: the UNet expects a pooled text embedding of {u.pooled_dim} "
                               f"(projection_class_embeddings_input_dim - 6 x addition_time_embed_dim) but "
                               f"text_encoder_2 projects to {t2.projection_dim}")
        if t.max_position_embeddings != t2.max_position_embeddings:
            raise SafeJaxError(f"{source}: the text encoders read {t.max_position_embeddings} and "
                               f"{t2.max_position_embeddings} tokens; safe-jax needs one length")
        a, b = self.tokenizer, self.tokenizer_2
        if a.get_vocab() != b.get_vocab() or a.eos_token_id != b.eos_token_id or a.bos_token_id != b.bos_token_id:
            raise SafeJaxError(f"{source}: tokenizer_2 is not tokenizer's vocabulary with other padding; "
                               "safe-jax supports SDXL's pair (both CLIP BPE)")

    # ------------------------------------------------------------------ parameters
    def _example_inputs(self) -> dict[str, tuple]:
        u, v, t = self.unet.config, self.vae.config, self.text_encoder.config
        s = 2 ** (len(u.block_out_channels) - 1)
        ids = (jnp.zeros((1, t.max_position_embeddings), jnp.int32),)
        return {
            "unet": (jnp.zeros((1, s, s, u.in_channels)), jnp.zeros((1,)), u.example_conditioning()),
            "vae": (jnp.zeros((1, v.downscale, v.downscale, v.in_channels)),),
            "text_encoder": ids, "text_encoder_2": ids,
        }

    def _modules(self) -> dict[str, Any]:
        modules = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}
        if self.text_encoder_2 is not None:
            modules["text_encoder_2"] = self.text_encoder_2
        return modules

    def abstract_params(self) -> Params:
        """Shapes and dtypes of every parameter, with no memory spent (``jax.eval_shape``)."""
        ex = self._example_inputs()
        return {k: jax.eval_shape(m.init, jax.random.key(0), *ex[k])["params"] for k, m in self._modules().items()}

    def init_params(self, seed: int = 0) -> Params:
        """Random weights drawn on the host from the abstract tree (``io.random_init``: no compile)."""
        return random_params(self.abstract_params(), seed)

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, params: Params, out_dir: str | Path, *, dtype: str = "float32") -> Path:
        """Write a diffusers folder that ``diffusers.StableDiffusionPipeline.from_pretrained`` (or,
        for SDXL, ``StableDiffusionXLPipeline``) loads.

        ``dtype`` is ``float32`` (bitwise what was loaded) or ``float16``; weights are safetensors.
        """
        if dtype not in ("float32", "float16", "bfloat16"):
            raise SafeJaxError(f"export dtype must be float32, float16 or bfloat16, not {dtype!r}")
        out = Path(out_dir)
        for name in XL_COMPONENTS if self.is_xl else COMPONENTS:
            (out / name).mkdir(parents=True, exist_ok=True)
        io.write_json(out / "unet" / "config.json", self.unet.config.to_diffusers())
        io.save_state_dict(flax_to_torch(params["unet"]), out / "unet" / "diffusion_pytorch_model.safetensors", dtype)
        io.write_json(out / "vae" / "config.json", self.vae.config.to_diffusers())
        io.save_state_dict(flax_to_torch(params["vae"]), out / "vae" / "diffusion_pytorch_model.safetensors", dtype)
        encoders = {"text_encoder": (self.text_encoder, "CLIPTextModel")}
        if self.is_xl:
            encoders["text_encoder_2"] = (self.text_encoder_2, "CLIPTextModelWithProjection")
        for name, (module, architecture) in encoders.items():
            io.write_json(out / name / "config.json", {**module.config.to_hf(), "architectures": [architecture]})
            # Keys spelled as the loaded checkpoint spelled them (transformers 5's unprefixed style for presets;
            # CLIPTextModelWithProjection always keeps text_model.).
            prefix = "text_model." if self.is_xl and name == "text_encoder_2" else module.config.state_dict_prefix
            io.save_state_dict(clip_text.to_hf_state_dict(params[name], prefix), out / name / "model.safetensors", dtype)
        tok.save_tokenizer(self.tokenizer, out / "tokenizer")
        io.write_json(out / "scheduler" / "scheduler_config.json", self.scheduler_config)
        index = {
            "_class_name": "StableDiffusionXLPipeline" if self.is_xl else "StableDiffusionPipeline",
            "_diffusers_version": "0.30.0",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", self.scheduler_config.get("_class_name", "DDIMScheduler")],
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
        }
        if self.is_xl:
            tok.save_tokenizer(self.tokenizer_2, out / "tokenizer_2")
            index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                         tokenizer_2=["transformers", "CLIPTokenizer"],
                         force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt)
        else:
            index.update(safety_checker=[None, None], requires_safety_checker=False)
        io.write_json(out / "model_index.json", index)  # last: a folder with it is complete
        return out

    # ------------------------------------------------------------------ text
    @functools.cached_property
    def conditioner(self) -> TextConditioner | DualTextConditioner:
        """The text encoder(s) and tokenizer(s) as the conditioning function training and
        evaluation share (SDXL: both encoders' penultimate layers and the pooled embedding)."""
        if self.is_xl:
            return DualTextConditioner(TextConditioner(self.text_encoder, self.tokenizer, hidden_layer=-2),
                                       TextConditioner(self.text_encoder_2, self.tokenizer_2, hidden_layer=-2))
        return TextConditioner(self.text_encoder, self.tokenizer)

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        return self.conditioner.tokenize(prompts)

    def token_weights(
        self,
        prompts: Sequence[str],
        subjects: Sequence[Sequence[str]] | None = None,
        subject_weight: float = DEFAULT_WEIGHT,
        subject_format: str = "plain",
        prompt_syntax: str | None = None,
    ):
        """Token ids and per-token weights [B, 77] for prompts, their subjects or their weight syntax."""
        return self.conditioner.token_weights(prompts, subjects, subject_weight, subject_format, prompt_syntax)

    def encode_prompt(
        self,
        params: Params,
        prompts: Sequence[str],
        subjects: Sequence[Sequence[str]] | None = None,
        subject_weight: float = DEFAULT_WEIGHT,
        weighting: str = "compel",
        subject_format: str = "plain",
        prompt_syntax: str | None = None,
    ) -> Any:
        """The text conditioning [B, 77, C] the UNet cross-attends to (SDXL: a dict of it, as
        ``encoder_hidden_states``, and the pooled ``text_embeds``; add ``time_ids`` with
        ``conditioner.with_time_ids``).

        ``subjects`` (a list of phrases per prompt) are up-weighted by ``subject_weight`` with
        ``weighting`` "compel" or "a1111" (SAFE part 1); ``subject_format`` "prefix" writes them
        before the caption too. ``prompt_syntax`` ("compel" / "a1111") reads hand-written weights
        instead. With neither, this is the plain CLIP encoding.
        """
        conditioner_lib.check_weighting(weighting)
        tw = self.token_weights(prompts, subjects, subject_weight, subject_format, prompt_syntax)
        k = conditioner_lib.num_downweighted(tw.weights, weighting)
        pooled_ids = self.conditioner.pooled_token_ids(prompts, tw.ids, prompt_syntax)
        return self._encode_weighted(self.conditioner.text_params(params), jnp.asarray(tw.ids), jnp.asarray(tw.weights),
                                     weighting, k, jnp.asarray(pooled_ids))

    @functools.partial(jax.jit, static_argnums=(0, 4, 5))
    def _encode_weighted(self, text_params: Params, ids: jax.Array, weights: jax.Array, weighting: str,
                         num_downweighted: int, pooled_ids: jax.Array) -> Any:
        return self.conditioner(text_params, ids, weights, weighting, num_downweighted, pooled_ids=pooled_ids)

    # ------------------------------------------------------------------ sampling
    @property
    def default_size(self) -> int:
        return self.unet.config.sample_size * self.vae.config.downscale

    def generate(
        self,
        params: Params,
        prompts: Sequence[str] | str,
        negative_prompts: Sequence[str] | str | None = None,
        num_steps: int = 50,
        guidance_scale: float = 7.5,
        scheduler: str | None = None,
        seed: int = 0,
        latents: np.ndarray | jax.Array | None = None,
        height: int | None = None,
        width: int | None = None,
        latents_layout: str = "auto",
        seeds: Sequence[int] | None = None,
        subjects: Sequence[Sequence[str]] | None = None,
        subject_weight: float = DEFAULT_WEIGHT,
        weighting: str = "compel",
        subject_format: str = "plain",
        prompt_syntax: str | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
    ) -> np.ndarray:
        """Images for ``prompts`` as uint8 [B, H, W, 3].

        ``scheduler`` is a sampler name (``schedulers.SAMPLERS``); by default the one the folder's
        scheduler config names (Euler for SDXL), DDIM where we have no sampler of that class.
        SDXL only: ``original_size``, ``crops_coords_top_left`` and ``target_size`` are its
        micro-conditioning, (height, width) by default as in diffusers; with no negative prompt and
        ``force_zeros_for_empty_prompt``, the unconditional embedding is zero, as in diffusers.

        ``subjects``, ``subject_weight``, ``weighting``, ``subject_format`` and ``prompt_syntax``
        weight the prompts' tokens as in ``encode_prompt``; negative prompts stay unweighted.
        Weights are arrays, so prompts and weights change without recompiling (Compel's w < 1
        blend compiles once per count of down-weighted fragments).

        Every image's randomness (its initial noise and, for euler_a, the noise of each step)
        comes from its own seed alone, like diffusers with one generator per image: image ``i``
        uses ``seeds[i]``, by default ``seed + i``. So an image does not depend on the other
        prompts, on the batch size or on the device count, and ``generate(params, prompt_i,
        seed=seed + i)`` draws it again. ``height`` and ``width`` are any multiple of the VAE's
        downscale (8 for SD), as in diffusers.

        ``latents`` is the initial unit-variance noise, [B, 4, h, w] (NCHW, as diffusers takes it)
        or [B, h, w, 4] (NHWC), h = H / 8 for SD; like diffusers, it is multiplied by the
        sampler's ``init_noise_sigma``. ``latents_layout`` settles the rare shapes where both
        readings fit. The batch is split over all local devices; the denoising loop is one
        ``lax.fori_loop`` compiled once per (sampler, steps, shape).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise SafeJaxError("generate: no prompts")
        zero_negative = self.is_xl and negative_prompts is None and self.force_zeros_for_empty_prompt
        if negative_prompts is None:
            negative_prompts = [""] * len(prompts)
        negative_prompts = [negative_prompts] * len(prompts) if isinstance(negative_prompts, str) else list(negative_prompts)
        if len(negative_prompts) != len(prompts):
            raise SafeJaxError(f"generate: {len(prompts)} prompts but {len(negative_prompts)} negative prompts")
        scheduler = self.default_sampler if scheduler is None else scheduler
        if scheduler not in schedulers.SAMPLERS:
            raise SafeJaxError(f"unknown scheduler {scheduler!r} (choose from {', '.join(schedulers.SAMPLERS)})")
        if num_steps < 1:
            raise SafeJaxError("num_steps must be at least 1")
        conditioner_lib.check_weighting(weighting)
        tw = self.token_weights(prompts, subjects, subject_weight, subject_format, prompt_syntax)
        num_downweighted = conditioner_lib.num_downweighted(tw.weights, weighting)
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        f = self.vae.config.downscale
        for name, size in (("height", height), ("width", width)):
            if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < f or size % f:
                raise SafeJaxError(f"generate: {name} must be a positive multiple of {f}, got {size!r}")
        b, c = len(prompts), self.unet.config.in_channels
        seeds = image_seeds(seed, b) if seeds is None else np.asarray(seeds, np.int64)
        if seeds.shape != (b,):
            raise SafeJaxError(f"generate: {len(prompts)} prompts but {seeds.size} seeds")
        if seeds.min() < 0 or seeds.max() >= 2 ** 32:
            raise SafeJaxError(f"generate: seeds must lie in [0, 2**32), got {seeds.min()}..{seeds.max()}")
        time_ids = np.zeros((b, 6), np.float32)
        if self.is_xl:
            sizes = {"original_size": original_size or (height, width), "crops_coords_top_left": crops_coords_top_left,
                     "target_size": target_size or (height, width)}
            for name, value in sizes.items():
                if (not isinstance(value, (tuple, list)) or len(value) != 2
                        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in value)):
                    raise SafeJaxError(f"generate: {name} must be (height, width) of integers >= 0, got {value!r}")
            time_ids[:] = [*sizes["original_size"], *sizes["crops_coords_top_left"], *sizes["target_size"]]
        shape = (b, height // f, width // f, c)
        noise = (self._to_nhwc(latents, shape, latents_layout) if latents is not None
                 else initial_noise(seeds, shape[1:]))

        mesh = sharding.make_mesh(devices=jax.local_devices())  # this host's devices, all on "data"
        pad = -b % mesh.size  # pad the batch to a multiple of the device count
        padded = lambda x: np.concatenate([x, np.repeat(x[-1:], pad, 0)]) if pad else x
        batch = sharding.batch_sharding(mesh)
        cond_ids, cond_weights = (jax.device_put(padded(x), batch) for x in tw)
        pooled_ids = jax.device_put(padded(self.conditioner.pooled_token_ids(prompts, tw.ids, prompt_syntax)), batch)
        uncond = jax.device_put(padded(self.tokenize(negative_prompts)), batch)
        noise = jax.device_put(padded(noise), batch)
        time_ids = jax.device_put(padded(time_ids), batch)
        step_keys = jax.device_put(padded(np.asarray(jax.random.key_data(_step_keys(seeds)))), batch)
        params = jax.device_put(params, NamedSharding(mesh, P()))
        fn = self._sampling_fn(scheduler, num_steps, guidance_scale > 1.0, mesh, weighting, num_downweighted,
                               zero_negative)
        images = fn(params, cond_ids, cond_weights, uncond, noise, jnp.float32(guidance_scale), step_keys, time_ids,
                    pooled_ids)
        return np.asarray(images)[:b]

    @staticmethod
    def _to_nhwc(latents, shape: tuple[int, ...], layout: str) -> np.ndarray:
        x = np.asarray(latents, np.float32)
        b, h, w, c = shape
        nchw, nhwc = x.shape == (b, c, h, w), x.shape == shape
        if layout == "NCHW" or (layout == "auto" and nchw and not nhwc):
            if not nchw:
                raise SafeJaxError(f"latents shape {x.shape} is not NCHW {(b, c, h, w)}")
            return x.transpose(0, 2, 3, 1)
        if layout in ("NHWC", "auto") and nhwc:
            return x
        raise SafeJaxError(f"latents shape {x.shape} matches neither NCHW {(b, c, h, w)} nor NHWC {shape}"
                           + (" (both fit: pass latents_layout)" if nchw and nhwc else ""))

    @property
    def default_sampler(self) -> str:
        """The sampler of the scheduler class the folder names, else DDIM."""
        return _SAMPLER_OF_CLASS.get(self.scheduler_config.get("_class_name"), "ddim")

    @functools.lru_cache(maxsize=16)
    def _sampling_fn(self, scheduler: str, num_steps: int, use_cfg: bool, mesh: Mesh, weighting: str = "compel",
                     num_downweighted: int = 0, zero_negative: bool = False):
        sampler = schedulers.make_sampler(scheduler, self.schedule, num_steps)
        vae_cfg = self.vae.config
        replicated, batch = NamedSharding(mesh, P()), sharding.batch_sharding(mesh)

        def sample(params, cond_ids, cond_weights, uncond_ids, noise, guidance, step_keys, time_ids, pooled_ids):
            text_params = self.conditioner.text_params(params)
            context = self.conditioner(text_params, cond_ids, cond_weights, weighting, num_downweighted,
                                       pooled_ids=pooled_ids)
            if use_cfg:  # the unconditional / negative embedding is never weighted
                uncond = (jax.tree.map(jnp.zeros_like, context) if zero_negative
                          else self.conditioner.encode(text_params, uncond_ids))
                context = jax.tree.map(lambda u, c: jnp.concatenate([u, c]), uncond, context)
                time_ids = jnp.concatenate([time_ids, time_ids])
            context = with_time_ids(context, time_ids)
            x = noise * sampler.init_noise_sigma

            def body(i, carry):
                x, state = carry
                model_in = sampler.scale_model_input(x, i)
                model_in = jnp.concatenate([model_in, model_in]) if use_cfg else model_in
                t = jnp.broadcast_to(jnp.asarray(sampler.timesteps)[i], (model_in.shape[0],))
                out = self.unet.apply({"params": params["unet"]}, model_in, t, context).astype(jnp.float32)
                if use_cfg:
                    out_uncond, out_cond = jnp.split(out, 2)
                    out = out_uncond + guidance * (out_cond - out_uncond)
                noise = None
                if sampler.name == "euler_a":  # each image's own draw, whatever the batch
                    keys = jax.random.wrap_key_data(step_keys)
                    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), x.shape[1:]))(keys)
                return sampler.step(state, out, i, x, noise=noise)

            x, _ = jax.lax.fori_loop(0, num_steps, body, (x, sampler.init_state(x)))
            z = x / vae_cfg.scaling_factor + (vae_cfg.shift_factor or 0.0)
            image = self.vae.apply({"params": params["vae"]}, z, method=AutoencoderKL.decode).astype(jnp.float32)
            return jnp.round(jnp.clip(image / 2 + 0.5, 0.0, 1.0) * 255).astype(jnp.uint8)

        return jax.jit(sample, in_shardings=(replicated, batch, batch, batch, batch, replicated, batch, batch, batch),
                       out_shardings=batch)


def _vae_dtype(config: VAEConfig, dtype: Any) -> Any:
    """The VAE's compute dtype: fp32 where the pipeline runs fp16 and the VAE asks for
    ``force_upcast`` (SDXL's VAE overflows in fp16, as diffusers knows); else the pipeline's."""
    return jnp.float32 if config.force_upcast and jnp.dtype(dtype) == jnp.float16 else dtype


def image_seeds(seed: int, n: int) -> np.ndarray:
    """The seed of each of ``n`` images drawn together from ``seed``: ``seed + i``, which is what
    a PNG records and what replays one image alone."""
    return np.arange(n, dtype=np.int64) + int(seed)


@functools.partial(jax.jit, static_argnums=1)
def _noise(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


def initial_noise(seeds: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Unit-variance starting latents [B, *shape], row ``i`` from ``seeds[i]`` alone."""
    return np.asarray(_noise(jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32)), tuple(shape)))


def _step_keys(seeds: np.ndarray) -> jax.Array:
    """Per-image keys for the ancestral sampler's step noise, apart from the initial noise's."""
    return jax.vmap(lambda k: jax.random.fold_in(k, 1 << 30))(jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32)))
