"""The demo's SAFE run: the shipped `tiny-anchor` (trained from scratch on the synthetic news
world) fine-tuned on `anchor/sample` train with denoising + ReFL, the DFE reward computed by the
world's reward CLIP (`tiny-anchor-reward`, whose text tower is the model's text encoder), LoRA
rank 8 on attention, subject weight 1.21. Minutes on two CPU cores.

    safe-jax train --config launch/configs/tiny_anchor_safe.py

Why ``loss.refl_lambda`` is not ImageReward's 2: ReFL's loss is ``relu(λ − r)``, and λ = 2 was
chosen for ImageReward's normalised scores (mean 0, std 1). DFE's caption term is a PickScore-style
``exp(logit_scale) · cos`` (here up to ~exp(logit_scale)) plus α · cos with the ground truth, so
λ = 2 would sit below almost every reward and the hinge would pass no gradient at all. A λ above
the reward's whole range makes ReFL maximise the reward everywhere, as ImageReward's λ does in
practice for its scale. ``refl_grad_scale`` is 0.1, not ImageReward's 1e-3: here the ReFL and
denoising steps share one AdamW, and at 1e-3 the ReFL gradient norms (~1e-4) were ~30× below the
denoising ones, so 40 ReFL steps moved the reward by 1% (8.31 → 8.39); at 0.1 and 100 ReFL steps it
rises 8.38 → 10.31 on the training captions.
"""

from launch.configs import base


def get_config():
    c = base.get_config()
    c.model = "tiny-anchor"
    c.workdir = "runs/tiny_anchor_safe"
    c.steps = 200
    c.mode = "lora"
    c.lora_rank = 8
    c.data.resolution = 64
    c.data.batch_size = 8
    c.data.flip = False               # the world is not mirror-symmetric (captions say who stands where)
    c.data.worker_count = 0           # 64² images decode in-process
    c.loss.kind = "both"
    c.loss.mix = "alternate"
    c.loss.cond_dropout = 0.1
    c.loss.refl_steps = 10            # a short rollout: x̂0 is predicted from t = 500 … 100
    c.loss.refl_step_min = 5
    c.loss.refl_step_max = 9
    c.loss.refl_lambda = 200.0        # above DFE's range: see the docstring
    c.loss.refl_grad_scale = 0.1
    c.reward.name = "dfe"
    c.reward.clip = "tiny-anchor-reward"
    c.reward.alpha = 1.0
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 10
    c.checkpoint.every = 20
    c.log_every = 5
    c.sample.every = 0
    c.sample.steps = 15               # the evaluation's DDIM steps
    c.sample.guidance = 4.0
    return c
