"""The world's UNet, trained from scratch on the world VAE's latents (16×16×4) and the reward
CLIP's text tower; exports the whole diffusers folder. See world_base.py."""

from launch.configs import world_base


def get_config(variant: str = ""):
    c = world_base.get_config("unet", "unet")
    c.vae = f"{world_base.ROOT}/vae/export"          # the world_vae run's export
    c.text = f"{world_base.ROOT}/clip_reward/export"  # the world_clip_reward run's export
    c.steps = 1000
    c.data.batch_size = 32
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 200
    c.optim.ema_decay = 0.995          # a horizon of ~200 steps (init keeps 0.995^1000 < 1% of the average): the export holds the EMA weights

    c.model = world_base.ConfigDict()
    c.model.block_out_channels = (64, 128, 128)
    c.model.layers_per_block = 1
    c.model.attention_heads = (2, 4, 4)  # head width 32 (diffusers' attention_head_dim counts heads)
    c.model.norm_num_groups = 32

    c.loss = world_base.ConfigDict()
    c.loss.cond_dropout = 0.1          # for classifier-free guidance
    c.loss.min_snr_gamma = 5.0

    c.sample = world_base.ConfigDict()
    c.sample.count = 8                # held-out captions drawn at each evaluation; 0: none
    c.sample.steps = 25
    c.sample.guidance = 4.0
    c.sample.scheduler = "ddim"
    c.eval_every = 1000
    if variant == "quick":  # reads the quick runs' exports
        c.vae, c.text = f"{world_base.ROOT}/vae_quick/export", f"{world_base.ROOT}/clip_reward_quick/export"
        return world_base.quick(c)
    return c
