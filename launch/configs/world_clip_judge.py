"""The judge CLIP: evaluation only (subject recall). Another size, init seed and data stream than
the reward CLIP, so the judge is not the model SAFE was optimised against. See world_base.py."""

from launch.configs import world_clip_reward


def get_config(variant: str = ""):
    c = world_clip_reward.get_config()
    c.workdir = "runs/world/clip_judge"
    c.seed = 1
    c.data.seed = 1
    c.steps = 1500
    c.model.text.update(hidden_size=96, layers=3, heads=4, mlp_size=384)
    c.model.vision.update(hidden_size=96, layers=3, heads=4, mlp_size=384, patch_size=8)
    c.model.projection_dim = 96
    return world_clip_reward.world_base.quick(c) if variant == "quick" else c
