"""The authors' recipe on Stable Diffusion 1.5: LoRA rank 4 on the attention projections, subject
weight 1.21 (Compel ++), 512² centre crop with random flip, batch 4 × accumulation 4, AdamW lr 1e-4
with a cosine schedule, weight decay 1e-2, clip 1, bf16 compute with fp32 master weights.

    safe-jax train --config launch/configs/sd15_safe.py --config.model=/models/stable-diffusion-v1-5 \\
        --config.data.data_dir=/data/tfds --config.reward.clip=/models/PickScore_v1

ReFL follows ImageReward's implementation (40-step schedule, gradient at a random step in
[30, 39], λ = 2, grad scale 1e-3), alternated with the denoising loss. The reward is DFE (ours):
the caption score of a CLIP reward model plus α · similarity with the ground-truth image.
"""

from launch.configs import base


def get_config():
    c = base.get_config()
    c.model = "/models/stable-diffusion-v1-5"  # a local diffusers folder
    c.workdir = "runs/sd15_safe"
    c.steps = 15000 * 4               # 15k optimizer updates × accumulation 4
    c.mode = "lora"
    c.lora_rank = 4
    c.remat_policy = "full"
    c.data.name = "anchor/default"
    c.data.resolution = 512
    c.data.batch_size = 4
    c.subjects.weight = 1.21
    c.optim.lr = 1e-4
    c.optim.schedule = "cosine"
    c.optim.weight_decay = 1e-2
    c.optim.clip_norm = 1.0
    c.optim.accumulate = 4
    c.reward.name = "dfe"
    c.reward.clip = "/models/PickScore_v1"  # a transformers CLIPModel folder
    c.checkpoint.every = 1000
    c.sample.every = 2000
    return c
