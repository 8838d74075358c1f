"""SAFE on Stable Diffusion 2.1 (768², v-prediction): the sd15 recipe otherwise.

    safe-jax train --config launch/configs/sd21_safe.py --config.model=/models/stable-diffusion-2-1
"""

from launch.configs import sd15_safe


def get_config():
    c = sd15_safe.get_config()
    c.model = "/models/stable-diffusion-2-1"
    c.workdir = "runs/sd21_safe"
    c.data.resolution = 768
    return c
