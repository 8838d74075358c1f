"""Pre-training from scratch: a VAE, CLIPs and a UNet for the synthetic news world, on our own stack.

SAFE fine-tunes a Stable Diffusion; to show it working without downloading one, the world's own
small Stable Diffusion is trained here first (``safe-jax pretrain``), and the exports are the
ordinary diffusers / transformers folders every other command reads.
"""
