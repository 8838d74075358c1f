"""What every world pre-training run shares (``safe-jax pretrain``); the world_*.py configs start here.

    safe-jax pretrain --config launch/configs/world_vae.py [--config.steps=200]
    safe-jax pretrain --config launch/configs/world_vae.py:quick      # minutes: a smoke run

Runs write to ``runs/world/<name>/``: checkpoints, metrics.jsonl, loss.png, samples/, summary.json
and ``export/`` (the model folder the next run, or SAFE, reads).
"""

from ml_collections import ConfigDict, config_dict

placeholder = config_dict.placeholder
ROOT = "runs/world"


def get_config(task: str, name: str) -> ConfigDict:
    c = ConfigDict()
    c.task = task                     # vae, clip or unet
    c.workdir = f"{ROOT}/{name}"
    c.seed = 0                        # parameter init and the step's randomness
    c.steps = 1000

    c.data = ConfigDict()
    c.data.seed = 0                   # the training stream; 1 000 000 (held out) is never trained on
    c.data.image_size = 64
    c.data.batch_size = 32
    c.data.prefetch = 2               # batches drawn ahead in a background thread

    c.optim = ConfigDict()
    c.optim.lr = 1e-3
    c.optim.schedule = "cosine"       # warmup, then cosine to 0; or "constant"
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 1e-2       # not on biases, norms or scalars
    c.optim.clip_norm = 1.0           # 0: no clipping
    c.optim.b2 = 0.99
    c.optim.ema_decay = placeholder(float)  # None: no EMA; else the export holds the EMA weights

    c.checkpoint = ConfigDict()
    c.checkpoint.every = 250
    c.checkpoint.keep = 2

    c.log_every = 50
    c.eval_every = 0                  # held-out metrics and samples every so many steps; 0: at the end only
    c.eval_examples = 64              # held-out examples they use

    c.export = ConfigDict()
    c.export.dir = ""                 # "": <workdir>/export
    c.export.dtype = "float16"        # what ships; the next run reads the export as it is
    return c


def quick(c: ConfigDict) -> ConfigDict:
    """A smoke run of the same architecture: a few steps, checkpoints and the export included."""
    c.steps = 20
    c.optim.warmup_steps = 5
    c.checkpoint.every = 10
    c.log_every = 5
    c.workdir = c.workdir + "_quick"
    return c
