"""The demo: the random `tiny` preset on `anchor/sample` at 64², denoising + ReFL (DFE reward with
a tiny random CLIP), LoRA rank 4, subject weight 1.21. Minutes on a laptop CPU."""

from launch.configs import base


def get_config():
    c = base.get_config()
    c.model = "tiny"
    c.workdir = "runs/tiny_safe"
    c.steps = 40
    c.data.resolution = 64
    c.data.batch_size = 8
    c.data.worker_count = 0           # decode in-process: 64² images do not need workers
    c.loss.refl_steps = 10            # a short ReFL schedule for the tiny model
    c.loss.refl_step_min = 6
    c.loss.refl_step_max = 9
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 4
    c.checkpoint.every = 10
    c.log_every = 5
    c.sample.every = 20
    c.sample.steps = 10
    c.sample.prompts = (
        "London's mayor Boris Johnson gives a big thumbs up to photographers on Tower Bridge.",
        "Firefighters pump water from a flooded street in Leeds.",
    )
    return c
