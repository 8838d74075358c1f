"""The reward CLIP: its text tower is also the world's text encoder (the UNet's conditioning), and
the DFE reward of SAFE's fine-tuning. See world_base.py."""

from launch.configs import world_base


def get_config(variant: str = ""):
    c = world_base.get_config("clip", "clip_reward")
    c.seed = 0
    c.steps = 1500
    c.data.seed = 0
    c.data.batch_size = 64            # in-batch negatives
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 200
    c.optim.weight_decay = 0.1

    c.model = world_base.ConfigDict()
    c.model.text = world_base.ConfigDict(dict(hidden_size=128, layers=4, heads=4, mlp_size=512))
    c.model.vision = world_base.ConfigDict(dict(hidden_size=128, layers=4, heads=4, mlp_size=512, patch_size=8))
    c.model.projection_dim = 128
    c.model.max_length = 77           # Stable Diffusion's: the tokenizer pads to it, the UNet reads it

    c.loss = world_base.ConfigDict()
    c.loss.subject_prompt_rate = 0.25  # texts that are "a photo of {subject}" instead of the caption
    c.vocab_examples = 4096            # training captions the tokenizer's vocabulary is built from
    c.eval_every = 500
    c.eval_examples = 256
    return world_base.quick(c) if variant == "quick" else c
