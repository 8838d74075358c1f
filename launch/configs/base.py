"""Every setting of a SAFE training run, with its default. Other configs start from this one.

    safe-jax train --config launch/configs/tiny_safe.py --config.steps=50 --config.workdir=runs/x

``steps`` counts train-step calls (micro-batches); with ``optim.accumulate = k`` the optimizer
updates every k of them. ``data.batch_size`` is the global batch (all hosts together).
"""

from ml_collections import ConfigDict, config_dict

from safe_jax.text.conditioner import DEFAULT_WEIGHT

placeholder = config_dict.placeholder


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.model = "tiny"                  # a local diffusers folder, or a preset: tiny, sd15, sd21, sd21-base
    c.dtype = ""                      # compute dtype; "" = bfloat16 on GPU/TPU, float32 on CPU
    c.attention_impl = ""             # "" (XLA's choice) or "cudnn"
    c.remat_policy = ""               # "" (none), "full", or a jax.checkpoint_policies name
    c.workdir = "runs/safe"
    c.seed = 0
    c.steps = 1000
    c.mode = "lora"                   # "lora" (rank `lora_rank` on attention q/k/v/out) or "full"
    c.lora_rank = 4
    c.lora_alpha = placeholder(float)  # None: alpha = rank (scale 1)

    c.data = ConfigDict()
    c.data.name = "anchor/sample"     # a TFDS name; build real ANCHOR with `tfds build` first
    c.data.data_dir = placeholder(str)
    c.data.split = "train"
    c.data.resolution = 512
    c.data.batch_size = 4             # global
    c.data.crop = "center"
    c.data.flip = True
    c.data.worker_count = 2
    c.data.read_threads = 2

    c.subjects = ConfigDict()         # SAFE part 1: how the caption's subjects weigh in the conditioning
    c.subjects.weight = DEFAULT_WEIGHT  # 1.1² = Compel's (subject)++, the paper's choice
    c.subjects.weighting = "compel"   # "compel" (z∅ + w·(z − z∅)) or "a1111" (z·w, mean restored)
    c.subjects.format = "plain"       # "plain", or "prefix" ("A photo of s1, s2. <caption>", the authors' code)
    c.subjects.max_downweighted = 8   # with weight < 1: Compel fragments blended per caption (static)

    c.mesh = ConfigDict()             # sizes; one may be -1 ("the rest")
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    c.loss = ConfigDict()
    c.loss.kind = "both"              # "denoising", "refl" or "both"
    c.loss.mix = "alternate"          # with "both": "alternate" (every second step is ReFL) or "weighted"
    c.loss.refl_weight = 1.0          # with "weighted": denoising + refl_weight · ReFL
    c.loss.cond_dropout = 0.1
    c.loss.min_snr_gamma = placeholder(float)
    c.loss.refl_steps = 40
    c.loss.refl_step_min = 30
    c.loss.refl_step_max = 39
    c.loss.refl_lambda = 2.0
    c.loss.refl_grad_scale = 1e-3

    c.reward = ConfigDict()
    c.reward.name = "dfe"             # dfe (ours: caption + α·ground-truth image), pickscore, clipscore, hps,
                                      # imagereward, brightness, ...
    c.reward.clip = "tiny"            # CLIP rewards: a transformers CLIPModel folder, or the random "tiny" preset
    c.reward.alpha = 1.0              # DFE's weight of the ground-truth image term
    c.reward.checkpoint = ""          # hps: HPS_v2_compressed.pt / HPS_v2.1_compressed.pt; imagereward: ImageReward.pt,
                                      # with med_config.json and bert-base-uncased's tokenizer/ beside it
    c.reward.arch = ""                # hps: an OpenCLIP architecture ("" = ViT-H-14); imagereward: the BLIP
                                      # vision preset ("" = large, ViT-L/16); what the checkpoint's shapes leave open

    c.optim = ConfigDict()
    c.optim.lr = 1e-4
    c.optim.schedule = "cosine"       # or "constant"
    c.optim.warmup_steps = 0
    c.optim.weight_decay = 1e-2
    c.optim.clip_norm = 1.0
    c.optim.accumulate = 1
    c.optim.ema_decay = placeholder(float)  # None: no EMA

    c.nan_policy = "skip"             # a NaN/Inf loss or gradient: "skip" the update or "halt" the run

    c.checkpoint = ConfigDict()
    c.checkpoint.every = 100
    c.checkpoint.keep = 3
    c.checkpoint.best_metric = "loss"  # also kept besides the last `keep`; "" for none
    c.checkpoint.best_mode = "min"
    c.checkpoint.async_save = True

    c.log_every = 10
    c.peak_tflops = placeholder(float)  # device peak for MFU where the device is not known

    c.sample = ConfigDict()
    c.sample.every = 0                # 0: no samples during training
    c.sample.prompts = ("London's mayor Boris Johnson gives a big thumbs up on Tower Bridge.",)
    c.sample.steps = 20
    c.sample.guidance = 7.5
    c.sample.scheduler = "ddim"

    c.export = ConfigDict()
    c.export.enabled = True           # a diffusers folder (LoRA merged) and the LoRA file, at the end
    c.export.dir = ""                 # "" = <workdir>/export
    c.export.dtype = "float32"
    c.export.use_ema = False          # export the EMA weights instead of the last ones
    return c
