"""The world's VAE: 64² pictures → 16×16×4 latents (3 blocks, 4× downscale). See world_base.py."""

from launch.configs import world_base


def get_config(variant: str = ""):
    c = world_base.get_config("vae", "vae")
    c.steps = 2500
    c.data.batch_size = 8
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 100

    c.model = world_base.ConfigDict()
    c.model.block_out_channels = (16, 32, 64)  # narrow at full resolution, where a step's time goes
    c.model.layers_per_block = 1
    c.model.latent_channels = 4
    c.model.norm_num_groups = 8

    c.loss = world_base.ConfigDict()
    c.loss.kl_weight = 1e-5           # per element; small, as in Stable Diffusion's VAE
    c.loss.gradient_weight = 0.5      # L1 of image gradients: sharp edges for little cost
    c.eval_every = 1000
    return world_base.quick(c) if variant == "quick" else c
