"""Diffusion schedulers as plain data plus pure functions.

diffusers schedulers keep a step counter and a history of model outputs on the object, which
cannot live inside ``jax.jit`` or a ``lax.fori_loop``. Here everything that depends only on the
training schedule, the step count and the step index is computed once in NumPy by
``make_sampler``; ``Sampler.step`` indexes those tables with a (possibly traced) step index and
carries the only history it needs (DPM-Solver++'s previous x0) in an explicit ``SamplerState``.
The tables reproduce diffusers' float32 arithmetic, quirks included, so trajectories match the
PyTorch schedulers to float32 rounding.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from safe_jax.errors import SafeJaxError
from safe_jax.sampling import SAMPLERS  # the names live in the package, JAX-free, for command lines

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
SPACINGS = ("leading", "trailing", "linspace")

_F32 = np.float32
# diffusers' Euler/DPM schedulers replace a zero terminal alpha_bar by this to keep sigma finite.
_ZERO_SNR_ALPHA_BAR = 2.0**-24


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


# Sigma options of diffusers' Euler and DPM-Solver schedulers, with the defaults we follow.
_SIGMA_OPTIONS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                  "interpolation_type": "linear", "timestep_type": "discrete", "sigma_min": None, "sigma_max": None}


@dataclass(frozen=True)
class ScheduleConfig:
    """The training noise schedule (diffusers' scheduler_config.json), validated on construction
    so a bad config fails at load time with one line instead of as NaNs mid-sampling."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> SafeJaxError:
            return SafeJaxError(f"scheduler config: {field}={getattr(self, field)!r} {why}")

        if not _is_int(self.num_train_timesteps) or self.num_train_timesteps < 2:
            raise bad("num_train_timesteps", "must be an integer >= 2")
        for name in ("beta_start", "beta_end"):
            v = getattr(self, name)
            if not _is_real(v):
                raise bad(name, "must be a finite number")
            if self.beta_schedule in ("linear", "scaled_linear") and not 0.0 < v < 1.0:
                raise bad(name, "must lie in (0, 1)")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise bad("beta_schedule", f"is not supported (choose from {', '.join(BETA_SCHEDULES)})")
        if self.prediction_type not in PREDICTION_TYPES:
            raise bad("prediction_type", f"is not supported (choose from {', '.join(PREDICTION_TYPES)})")
        if self.timestep_spacing not in SPACINGS:
            raise bad("timestep_spacing", f"is not supported (choose from {', '.join(SPACINGS)})")
        if not _is_int(self.steps_offset) or self.steps_offset < 0:
            raise bad("steps_offset", "must be a non-negative integer")
        for name in ("set_alpha_to_one", "rescale_betas_zero_snr"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true or false")

    @classmethod
    def from_diffusers(cls, cfg: Mapping[str, Any]) -> "ScheduleConfig":
        """Keeps only what defines the training schedule; sampler-specific keys (clip_sample,
        skip_prk_steps, solver settings) do not change the trained model and are ignored."""
        if not isinstance(cfg, Mapping):
            raise SafeJaxError(f"scheduler config must be a JSON object, got {type(cfg).__name__}")
        if cfg.get("trained_betas") is not None:
            raise SafeJaxError("scheduler config: explicit trained_betas are not supported")
        for key in ("clip_sample", "thresholding"):
            if cfg.get(key):
                logging.getLogger(__name__).warning(
                    "scheduler config: %s=true is ignored; our samplers never clip or threshold x0 (diffusers' "
                    "%s would, so its images can differ from ours)", key, cfg.get("_class_name", "scheduler"))
        for key, default in _SIGMA_OPTIONS.items():  # samplers' own sigma options, which we do not implement
            if cfg.get(key) is not None and cfg.get(key) != default:
                logging.getLogger(__name__).warning(
                    "scheduler config: %s=%s is ignored; our samplers use the training schedule's own sigmas "
                    "(%s's would differ, and so would its images)", key, json.dumps(cfg[key]),
                    cfg.get("_class_name", "diffusers' scheduler"))
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in names and v is not None})

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "ScheduleConfig":
        """Accepts the JSON file itself, a scheduler/ folder, or a diffusers model folder."""
        p = os.fspath(path)
        if os.path.isdir(p):
            for cand in ("scheduler_config.json", os.path.join("scheduler", "scheduler_config.json")):
                if os.path.isfile(os.path.join(p, cand)):
                    p = os.path.join(p, cand)
                    break
        try:
            with open(p, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise SafeJaxError(f"{p}: scheduler config not found") from None
        except IsADirectoryError:
            raise SafeJaxError(f"{p}: no scheduler_config.json in this folder") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafeJaxError(f"{p}: not valid JSON ({e})") from None
        except OSError as e:
            raise SafeJaxError(f"{p}: cannot read scheduler config ({e.strerror})") from None
        return cls.from_diffusers(raw)

    def to_diffusers(self, class_name: str = "DDIMScheduler") -> dict[str, Any]:
        """A config that makes diffusers' ``class_name`` behave like our sampler of the same kind
        (used for export and for parity tests)."""
        out: dict[str, Any] = {
            "_class_name": class_name,
            "num_train_timesteps": self.num_train_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "beta_schedule": self.beta_schedule,
            "trained_betas": None,
            "prediction_type": self.prediction_type,
            "timestep_spacing": self.timestep_spacing,
            "steps_offset": self.steps_offset,
            "rescale_betas_zero_snr": self.rescale_betas_zero_snr,
        }
        if class_name in ("DDIMScheduler", "PNDMScheduler", "DDIMInverseScheduler"):
            out["set_alpha_to_one"] = self.set_alpha_to_one
        if class_name in ("DDIMScheduler", "DDPMScheduler", "DDIMInverseScheduler"):
            out["clip_sample"] = False  # latents are not in [-1, 1]; our DDIM never clips
        if class_name == "PNDMScheduler":
            out["skip_prk_steps"] = True
        if class_name == "DPMSolverMultistepScheduler":
            out.update(
                algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                lower_order_final=True, euler_at_final=False, final_sigmas_type="zero",
                use_karras_sigmas=False, thresholding=False,
            )
        if class_name == "EulerDiscreteScheduler":
            out.update(
                interpolation_type="linear", use_karras_sigmas=False, use_exponential_sigmas=False,
                use_beta_sigmas=False, timestep_type="discrete", final_sigmas_type="zero",
            )
        return out


# ----------------------------------------------------------------------------- training schedule


def _torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(float32) on CPU: float32 step, symmetric halves, fused multiply-add.
    Bit for bit as torch's AVX2 / AVX-512 kernels; its scalar fallback (ATEN_CPU_CAPABILITY=default)
    can differ by an ulp or two, which is why the tests compare in ulps."""
    s, e = _F32(start), _F32(end)
    step = _F32((e - s) / _F32(n - 1))
    idx = np.arange(n, dtype=np.float64)
    fwd = np.float64(s) + np.float64(step) * idx
    bwd = np.float64(e) - np.float64(step) * (n - 1 - idx)
    return np.where(idx < n // 2, fwd, bwd).astype(_F32)


def _cumprod_f32(x: np.ndarray) -> np.ndarray:
    """torch.cumprod(float32) on CPU accumulates in float64 and rounds each output."""
    return np.cumprod(x.astype(np.float64)).astype(_F32)


def _betas(cfg: ScheduleConfig) -> np.ndarray:
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        betas = _torch_linspace_f32(cfg.beta_start, cfg.beta_end, n)
    elif cfg.beta_schedule == "scaled_linear":
        r = _torch_linspace_f32(cfg.beta_start**0.5, cfg.beta_end**0.5, n)
        betas = r * r
    else:  # squaredcos_cap_v2: computed in Python doubles, then stored as float32
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], _F32)
    if cfg.rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1, in the same float32 operation order as diffusers."""
    root = np.sqrt(_cumprod_f32(_F32(1) - betas))
    first, last = root[0], root[-1]
    root = (root - last) * _F32(first / (first - last))
    bar = root * root
    alphas = np.concatenate([bar[:1], bar[1:] / bar[:-1]])
    return (_F32(1) - alphas).astype(_F32)


@lru_cache(maxsize=32)
def _alphas_cumprod_cached(cfg: ScheduleConfig) -> np.ndarray:
    out = _cumprod_f32(_F32(1) - _betas(cfg))
    out.setflags(write=False)
    return out


def alphas_cumprod(cfg: ScheduleConfig) -> np.ndarray:
    """alpha_bar_t, float32 [num_train_timesteps], bit-identical to diffusers' so training targets
    and sampler tables agree with the PyTorch reference exactly."""
    return _alphas_cumprod_cached(cfg).copy()


def _table(cfg_or_alphas: ScheduleConfig | Any) -> jax.Array:
    if isinstance(cfg_or_alphas, ScheduleConfig):
        return jnp.asarray(_alphas_cumprod_cached(cfg_or_alphas))
    return jnp.asarray(cfg_or_alphas, jnp.float32)


def _per_sample(coef: jax.Array, x: jax.Array) -> jax.Array:
    """Coefficients indexed by t [B] broadcast over any trailing layout (NCHW or NHWC)."""
    return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim)).astype(x.dtype)


def add_noise(cfg_or_alphas: ScheduleConfig | Any, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """Forward process q(x_t | x_0); the same arithmetic as diffusers' add_noise."""
    ac = _table(cfg_or_alphas)[jnp.asarray(t)]
    return _per_sample(jnp.sqrt(ac), x0) * x0 + _per_sample(jnp.sqrt(1.0 - ac), x0) * noise


def velocity(cfg_or_alphas: ScheduleConfig | Any, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """v = sqrt(alpha_bar) * eps - sqrt(1 - alpha_bar) * x0, the target of v-prediction models."""
    ac = _table(cfg_or_alphas)[jnp.asarray(t)]
    return _per_sample(jnp.sqrt(ac), x0) * noise - _per_sample(jnp.sqrt(1.0 - ac), x0) * x0


def training_target(cfg: ScheduleConfig, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """What the UNet must predict for this config, so the training loop need not branch."""
    if cfg.prediction_type == "epsilon":
        return noise
    return velocity(cfg, x0, noise, t)


def snr(cfg_or_alphas: ScheduleConfig | Any, t: jax.Array) -> jax.Array:
    """alpha_bar / (1 - alpha_bar) per sample, for min-SNR loss weighting."""
    ac = _table(cfg_or_alphas)[jnp.asarray(t)]
    return ac / (1.0 - ac)


# ----------------------------------------------------------------------------- samplers


class SamplerState(NamedTuple):
    """The history a multistep sampler carries between steps; unused (zeros) by one-step samplers
    so every sampler has the same loop carry."""

    prev_x0: jax.Array


@dataclass(frozen=True, eq=False)
class Sampler:
    """Precomputed per-step tables for one (sampler, schedule, step count).

    ``timesteps`` holds the UNet's timestep input for each step as float32 for every sampler
    (integer-valued for ddim and dpm++2m; euler and euler_a with linspace spacing are fractional,
    as in diffusers). ``coef`` maps names to float32 [num_steps] tables whose meaning depends on
    ``name``; ``step`` reads them at the step index.

    It is a registered pytree (tables are leaves, the rest static), so it can be closed over
    as a constant or passed to a jitted function as an argument.
    """

    name: str
    prediction_type: str
    timesteps: np.ndarray
    init_noise_sigma: float
    coef: Mapping[str, np.ndarray]

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def _c(self, key: str, i: jax.Array | int) -> jax.Array:
        return jnp.asarray(self.coef[key])[i]

    def timestep(self, i: jax.Array | int) -> jax.Array:
        """The UNet timestep input at step ``i`` (traced-index friendly)."""
        return jnp.asarray(self.timesteps)[i]

    def scale_model_input(self, sample: jax.Array, i: jax.Array | int) -> jax.Array:
        """Euler works in the variance-exploding parameterisation; the UNet expects unit variance."""
        if self.name not in ("euler", "euler_a"):
            return sample
        return (sample.astype(jnp.float32) / self._c("in_div", i)).astype(sample.dtype)

    def init_state(self, sample: jax.Array) -> SamplerState:
        """A zero history, so the loop carry has a fixed structure from the first step."""
        return SamplerState(prev_x0=jnp.zeros_like(sample))

    def step(
        self,
        state: SamplerState,
        model_output: jax.Array,
        i: jax.Array | int,
        sample: jax.Array,
        key: jax.Array | None = None,
        *,
        noise: jax.Array | None = None,
    ) -> tuple[jax.Array, SamplerState]:
        """One denoising step, pure. ``key`` (or an explicit ``noise``, for reproducing another
        implementation's draws) is used only by the ancestral sampler. Arithmetic is float32;
        the result keeps ``sample``'s dtype so a fori_loop carry stays fixed."""
        x = sample.astype(jnp.float32)
        out = model_output.astype(jnp.float32)
        if self.name == "ddim":
            nxt = self._ddim(out, i, x)
        elif self.name == "euler":
            nxt = self._euler(out, i, x)
        elif self.name == "euler_a":
            if noise is None:
                if key is None:
                    raise SafeJaxError("euler_a needs a PRNG key (or explicit noise) at every step")
                noise = jax.random.normal(key, x.shape, jnp.float32)
            nxt = self._euler_a(out, i, x, noise.astype(jnp.float32))
        else:
            nxt, x0 = self._dpmpp_2m(state, out, i, x)
            state = SamplerState(prev_x0=x0.astype(state.prev_x0.dtype))
        return nxt.astype(sample.dtype), state

    def _ddim(self, out: jax.Array, i: jax.Array | int, x: jax.Array) -> jax.Array:
        # Deterministic DDIM (eta = 0): re-noise the x0 estimate to the previous timestep.
        sa, sb = self._c("sqrt_a", i), self._c("sqrt_b", i)
        if self.prediction_type == "epsilon":
            x0, eps = (x - sb * out) / sa, out
        else:
            x0, eps = sa * x - sb * out, sa * out + sb * x
        return self._c("sqrt_a_prev", i) * x0 + self._c("sqrt_b_prev", i) * eps

    def _euler(self, out: jax.Array, i: jax.Array | int, x: jax.Array) -> jax.Array:
        # Deterministic Euler step from sigma to the table's target sigma ("dt" = target - sigma):
        # the next sigma for euler (s_churn = 0), sigma_down for euler_a.
        sigma = self._c("sigma", i)
        if self.prediction_type == "epsilon":
            x0 = x - sigma * out
        else:
            x0 = out * self._c("v_out", i) + x / self._c("in_div_sq", i)
        derivative = (x - x0) / sigma
        return x + derivative * self._c("dt", i)

    def _euler_a(self, out: jax.Array, i: jax.Array | int, x: jax.Array, noise: jax.Array) -> jax.Array:
        # Deterministic Euler step down to sigma_down, then fresh noise of std sigma_up.
        return self._euler(out, i, x) + noise * self._c("sigma_up", i)

    def _dpmpp_2m(
        self, state: SamplerState, out: jax.Array, i: jax.Array | int, x: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        # Exponential-integrator update on x0 predictions; the second-order correction's
        # coefficient is zero on first-order steps (first and last), so no branch is traced.
        alpha, sigma = self._c("alpha", i), self._c("sigma", i)
        if self.prediction_type == "epsilon":
            x0 = (x - sigma * out) / alpha
        else:
            x0 = alpha * x - sigma * out
        d1 = self._c("inv_r0", i) * (x0 - state.prev_x0.astype(jnp.float32))
        nxt = self._c("ratio", i) * x - self._c("phi", i) * x0 - self._c("half_phi", i) * d1
        return nxt, x0


jax.tree_util.register_dataclass(
    Sampler, data_fields=["timesteps", "coef"], meta_fields=["name", "prediction_type", "init_noise_sigma"]
)


def _trailing(last: int, num_train: int, num_steps: int) -> np.ndarray:
    # diffusers' np.arange(T, 0, -T/N) yields N+1 points for some N (61, 103, ...), the extra
    # one being timestep -1; we keep the first N, which equal diffusers' for every N.
    return np.arange(last, 0, -num_train / num_steps)[:num_steps].round().astype(np.int64) - 1


def _timesteps_ddim_like(cfg: ScheduleConfig, n: int, dtype: Any) -> np.ndarray:
    """DDIM / Euler spacing over num_train_timesteps with n points."""
    T = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        if dtype == np.float32:  # Euler keeps fractional timesteps
            return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
        return np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    if cfg.timestep_spacing == "leading":
        return (np.arange(n) * (T // n)).round()[::-1].astype(dtype) + dtype(cfg.steps_offset)
    return _trailing(T, T, n).astype(dtype)


def _timesteps_dpm(cfg: ScheduleConfig, n: int) -> np.ndarray:
    """DPM-Solver's spacing: n+1 points with the last (t = 0) dropped."""
    T = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if cfg.timestep_spacing == "leading":
        ratio = T // (n + 1)
        return (np.arange(n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + cfg.steps_offset
    return _trailing(T, T, n)


def _train_sigmas(cfg: ScheduleConfig) -> np.ndarray:
    """Karras sigmas of the training schedule, as Euler/DPM see them (zero SNR clamped)."""
    ac = alphas_cumprod(cfg)
    if cfg.rescale_betas_zero_snr:
        ac[-1] = _ZERO_SNR_ALPHA_BAR
    return np.sqrt((_F32(1) - ac) / ac)


def _interp_sigmas(cfg: ScheduleConfig, timesteps: np.ndarray) -> np.ndarray:
    base = _train_sigmas(cfg)
    s = np.interp(timesteps, np.arange(len(base)), base)
    return np.concatenate([s, [0.0]]).astype(_F32)


def _make_ddim(cfg: ScheduleConfig, n: int) -> Sampler:
    ts = _timesteps_ddim_like(cfg, n, np.int64)
    ac = alphas_cumprod(cfg)
    final = _F32(1.0) if cfg.set_alpha_to_one else ac[0]
    # diffusers steps back by T // n whatever the spacing, so with trailing/linspace the
    # "previous" alpha is not the next timestep's.
    prev = ts - cfg.num_train_timesteps // n
    a = ac[ts]
    if cfg.prediction_type == "epsilon" and np.any(a == 0):
        raise SafeJaxError(
            "ddim: zero terminal SNR with epsilon prediction divides by zero at t = T-1; "
            "use a v_prediction model or leading spacing"
        )
    a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final).astype(_F32)
    coef = {
        "sqrt_a": np.sqrt(a),
        "sqrt_b": np.sqrt(_F32(1) - a),
        "sqrt_a_prev": np.sqrt(a_prev),
        "sqrt_b_prev": np.sqrt(_F32(1) - a_prev),
    }
    return Sampler("ddim", cfg.prediction_type, ts.astype(_F32), 1.0, coef)


def _euler_tables(cfg: ScheduleConfig, n: int) -> tuple[np.ndarray, np.ndarray, float, dict[str, np.ndarray]]:
    """What EulerDiscreteScheduler and EulerAncestralDiscreteScheduler share with their diffusers
    defaults (interpolation_type "linear", no Karras/exponential/beta sigmas, final sigma 0):
    timesteps, the n+1 sigmas, init_noise_sigma and the input-scaling / v-prediction tables."""
    ts = _timesteps_ddim_like(cfg, n, np.float32)
    sig = _interp_sigmas(cfg, ts)
    s_from = sig[:-1]
    var = s_from * s_from + _F32(1)
    smax = sig.max()
    init = smax if cfg.timestep_spacing in ("linspace", "trailing") else np.sqrt(smax * smax + _F32(1))
    coef = {
        "sigma": s_from,
        "in_div": np.sqrt(var),
        "in_div_sq": var,
        "v_out": -s_from / np.sqrt(var),
    }
    return ts, sig, float(init), coef


def _make_euler(cfg: ScheduleConfig, n: int) -> Sampler:
    # diffusers' step() with its default s_churn = 0: gamma = 0, sigma_hat = sigma * 1 = sigma,
    # no noise drawn, so the sampler is deterministic and dt is simply next sigma - sigma.
    ts, sig, init, coef = _euler_tables(cfg, n)
    coef["dt"] = sig[1:] - sig[:-1]
    return Sampler("euler", cfg.prediction_type, ts, init, coef)


def _make_euler_a(cfg: ScheduleConfig, n: int) -> Sampler:
    ts, sig, init, coef = _euler_tables(cfg, n)
    s_from, s_to = sig[:-1], sig[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        up = np.sqrt(s_to * s_to * (s_from * s_from - s_to * s_to) / (s_from * s_from))
        down = np.sqrt(np.maximum(s_to * s_to - up * up, _F32(0)))
    coef["dt"] = down - s_from
    coef["sigma_up"] = up
    return Sampler("euler_a", cfg.prediction_type, ts, init, coef)


def _make_dpmpp_2m(cfg: ScheduleConfig, n: int) -> Sampler:
    ts = _timesteps_dpm(cfg, n)
    sig = _interp_sigmas(cfg, ts)  # final sigma is 0 ("zero" final_sigmas_type)
    alpha = _F32(1) / np.sqrt(sig * sig + _F32(1))
    sigma = sig * alpha
    pos = sigma > 0
    # lambda = log(alpha/sigma); +inf at the final sigma 0, kept out of every table below.
    lam = np.where(pos, np.log(alpha) - np.log(np.where(pos, sigma, _F32(1))), np.inf).astype(_F32)
    m = len(ts)
    h = lam[1:] - lam[:-1]
    emh = np.where(pos[1:], np.exp(-np.where(pos[1:], h, _F32(0))), _F32(0)).astype(_F32)
    ratio = np.where(pos[1:], sigma[1:] / sigma[:-1], _F32(0)).astype(_F32)
    phi = (alpha[1:] * (emh - _F32(1))).astype(_F32)
    # Second order needs a previous x0 (not at step 0) and, with lower_order_final and final
    # sigma 0, is never used on the last step.
    second = (np.arange(m) > 0) & (np.arange(m) < m - 1)
    h0 = np.zeros(m, _F32)
    h0[1:] = lam[1:m] - lam[: m - 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_r0 = np.where(second, _F32(1) / (h0 / np.where(second, h, _F32(1))), _F32(0)).astype(_F32)
    coef = {
        "alpha": alpha[:-1],
        "sigma": sigma[:-1],
        "ratio": ratio,
        "phi": phi,
        "half_phi": np.where(second, _F32(0.5) * phi, _F32(0)).astype(_F32),
        "inv_r0": inv_r0,
    }
    return Sampler("dpm++2m", cfg.prediction_type, ts.astype(_F32), 1.0, coef)


def make_sampler(name: str, cfg: ScheduleConfig, num_steps: int) -> Sampler:
    """Build every table a sampler needs once, on the host, so the jitted loop only indexes."""
    if name not in SAMPLERS:
        raise SafeJaxError(f"unknown sampler {name!r} (choose from {', '.join(SAMPLERS)})")
    if not _is_int(num_steps) or not 1 <= num_steps <= cfg.num_train_timesteps:
        raise SafeJaxError(f"num_steps must be an integer in [1, {cfg.num_train_timesteps}], got {num_steps!r}")
    build = {"ddim": _make_ddim, "euler": _make_euler, "euler_a": _make_euler_a, "dpm++2m": _make_dpmpp_2m}[name]
    sampler = build(cfg, int(num_steps))
    for k, v in sampler.coef.items():
        if not np.all(np.isfinite(v)):
            raise SafeJaxError(f"{name}: non-finite {k} coefficients for this schedule")
    return sampler
