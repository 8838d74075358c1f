"""safe-jax: SAFE subject conditioning and domain fine-tuning for Stable Diffusion in JAX/Flax."""

from safe_jax.errors import SafeJaxError
from safe_jax.pipeline import StableDiffusion

__all__ = ["SafeJaxError", "StableDiffusion"]
