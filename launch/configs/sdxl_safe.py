"""SAFE on Stable Diffusion XL base 1.0: the SD 1.5 recipe (``sd15_safe``) at 1024², LoRA rank 4 on
the attention projections, 16 images per optimizer update (8 × accumulation 2), bf16 compute with fp32 master weights, full remat, and the parameters,
optimizer state and frozen encoders sharded FSDP-style over every device of the mesh.

    safe-jax train --config launch/configs/sdxl_safe.py --config.model=/models/stable-diffusion-xl-base-1.0 \\
        --config.data.data_dir=/data/tfds --config.reward.clip=/models/PickScore_v1

Same command, same road as SD 1.5: both text encoders' penultimate layers are subject-weighted
(Compel's SDXL mode), the pooled embedding is not, and each image's original size and crop are its
micro-conditioning time ids (the input pipeline records them). ReFL decodes 1024² images through
SDXL's VAE and scores them with the DFE reward; the sample grids use SDXL's Euler sampler.
"""

from launch.configs import sd15_safe


def get_config():
    c = sd15_safe.get_config()          # the same recipe: data, subject weight, optimizer, reward, checkpoints
    c.model = "/models/stable-diffusion-xl-base-1.0"  # a local diffusers StableDiffusionXLPipeline folder
    c.workdir = "runs/sdxl_safe"
    c.steps = 15000 * 2               # 15k optimizer updates × accumulation 2
    c.dtype = "bfloat16"
    c.mesh.data = 1                   # every device on the FSDP axis: a 2.6B UNet and its optimizer state
    c.mesh.fsdp = -1                  # are split across the mesh, the batch too
    c.data.resolution = 1024
    c.data.batch_size = 8             # per process, a multiple of the device count: 8 × 2 = sd15_safe's 16
    c.optim.accumulate = 2
    c.sample.scheduler = "euler"
    c.sample.steps = 30
    c.sample.guidance = 5.0
    return c
