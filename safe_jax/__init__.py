"""safe-jax: SAFE subject conditioning and domain fine-tuning for Stable Diffusion in JAX/Flax."""

from safe_jax.errors import SafeJaxError

__all__ = ["SafeJaxError", "StableDiffusion"]


def __getattr__(name: str):
    # Lazy, so that `safe_jax.text.subjects` and the CLI start without importing JAX.
    if name == "StableDiffusion":
        from safe_jax.sampling.stable_diffusion import StableDiffusion
        return StableDiffusion
    raise AttributeError(f"module 'safe_jax' has no attribute {name!r}")
