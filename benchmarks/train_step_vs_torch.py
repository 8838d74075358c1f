"""Time our whole SAFE train step against a PyTorch/diffusers loop doing the same work, and measure
what rematerialisation saves on the ReFL step.

(a) denoising: our ``make_train_step`` (StepConfig(mode="full", loss="denoising")) compiled with
    ``compile_train_step`` on a 1-device mesh, against diffusers: frozen CLIP text encoder with the
    same Compel subject weighting and conditioning dropout, VAE encode + posterior sample, noise,
    DDPMScheduler.add_noise, epsilon MSE, backward, clip_grad_norm_(1.0), torch.optim.AdamW.
(b) ReFL: our step with loss="refl" against ImageReward's ReFL loop: DDIMScheduler with
    ``--refl-steps`` steps, a no-grad rollout to step j, one UNet call with gradient predicting x0,
    VAE decode, reward, ``mean(relu(lambda - r)) * grad_scale``, backward, clip, AdamW. j is fixed and
    equal on both sides (our step range is (j, j)), so both do the same number of UNet calls. Reward:
    mean brightness on both sides (a CLIP reward would add a third model to port, not to compare).
(c) peak memory of our ReFL step with ``remat_policy="full"`` against None, each in a fresh
    subprocess: XLA's ``memory_analysis()`` of the compiled step (temp; and arguments + outputs -
    aliased + temp), the process's peak RSS during two steps (VmHWM after resetting it once the
    step is compiled) and before that (loading + compiling), and XLA's FLOP count (remat must raise
    it). On XLA:CPU remat saves nothing (see the note printed with the table): the figure that
    matters is the GPU's, e.g. from benchmarks/gpu_train_step.py --remat.

Both sides load the same weights: ours are drawn by ``init_params``, written with
``StableDiffusion.save_pretrained`` to a temporary folder, and loaded from it by both diffusers and
``StableDiffusion.from_pretrained`` (a forward check of UNet and text encoder precedes the timing).
Our EMA is off by default (the PyTorch loop has none; --ema adds it to both sides). Sides alternate
rounds in one process; see benchmarks/unet_train_step.py on noise ("quiet median").

    python benchmarks/train_step_vs_torch.py                     # config tiny, ReFL j = 30 of 40 (~4 min)
    python benchmarks/train_step_vs_torch.py --quick             # smoke run (~4 min, mostly compiling)
    python benchmarks/train_step_vs_torch.py --configs tiny,mid --cpus 1   # + the 142M UNet (~13 min more)

Configs: ``tiny`` = the ``tiny`` preset at its native 64x64 images (32x32 latents), batch 2.
``mid`` = the SD1.5 UNet layout at block_out_channels (128, 256, 512, 512) (142M parameters, as in
unet_train_step.py), a 4-level VAE at widths (32, 64, 128, 128) (8x downscale) on 256x256 images
(32x32 latents), a 2-layer CLIP text encoder of width 768 with the real vocabulary, batch 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from unet_train_step import interleave  # noqa: E402  (the alternating-rounds timer and load meter)

GOAL_RATIO = 0.80
GOAL_REMAT = 0.50

CONFIGS = {
    "tiny": dict(preset="tiny", batch=2, refl_step=30, mem_batch=4),
    "mid": dict(
        unet=dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, cross_attention_dim=768,
                  attention_head_dim=8, sample_size=32, norm_num_groups=32,
                  down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                  up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3),
        vae=dict(block_out_channels=[32, 64, 128, 128], layers_per_block=1, latent_channels=4, norm_num_groups=32,
                 sample_size=256, scaling_factor=0.18215),
        text=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=2,
                  num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768,
                  bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        batch=1, refl_step=8, mem_batch=2),
}
CAPTIONS = [("Boris Johnson on Tower Bridge", ["Boris Johnson"]),
            ("firefighters at a flooded street in Leeds", ["firefighters"])]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="tiny", help="comma-separated: tiny, mid")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: per config, tiny 2, mid 1)")
    p.add_argument("--refl-steps", type=int, default=40, help="DDIM steps of the ReFL schedule (ImageReward: 40)")
    p.add_argument("--refl-step", type=int, default=None,
                   help="the fixed step j of both sides (rollout of j no-grad UNet calls, then one with grad); "
                        "ImageReward draws it from [30, 39]; default per config: tiny 30, mid 8")
    p.add_argument("--cases", default="denoising,refl,memory", help="any of denoising, refl, memory")
    p.add_argument("--mem-batch", type=int, default=None, help="batch of the memory runs (default: per config, 4/2)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per side per round")
    p.add_argument("--repeats", type=int, default=2, help="rounds, alternating ours / PyTorch")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side (ours: after the compile)")
    p.add_argument("--quick", action="store_true", help="tiny config, short ReFL, few steps: a smoke run")
    p.add_argument("--ema", action="store_true", help="EMA of the weights (0.999) on both sides")
    p.add_argument("--cond-dropout", type=float, default=0.1, help="conditioning dropout, both sides")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS before jax is imported")
    p.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--torch-foreach", action="store_true", help="torch AdamW(foreach=True)")
    p.add_argument("--cpus", type=int, default=None, help="pin to this many cores before JAX and torch start")
    p.add_argument("--quiet", type=float, default=0.10,
                   help="a step counts as quiet when other processes used less than this fraction of the CPUs")
    p.add_argument("--min-quiet", type=int, default=0, help="add rounds until each side has this many quiet steps")
    p.add_argument("--max-rounds", type=int, default=6)
    p.add_argument("--mem-child", default=None, help=argparse.SUPPRESS)  # "<folder>|<remat>|<batch>|<refl>|<j>"
    args = p.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in args.configs:
        if c not in CONFIGS:
            p.error(f"unknown config {c!r} (choose from {', '.join(CONFIGS)})")
    args.cases = {c.strip() for c in args.cases.split(",") if c.strip()}
    if args.quick:
        args.refl_steps = min(args.refl_steps, 10)
        args.steps, args.repeats, args.warmup = min(args.steps, 2), 1, 1
    return args


# ------------------------------------------------------------------------------------------ models
def build_ours(name: str, seed: int):
    """(pipe, params) of a config, random weights."""
    import jax.numpy as jnp

    from safe_jax.io.presets import PRESETS
    from safe_jax.models import clip_text
    from safe_jax.models.unet import UNet2DConditionModel, UNetConfig
    from safe_jax.models.vae import AutoencoderKL, VAEConfig
    from safe_jax.sampling import schedulers
    from safe_jax.sampling.stable_diffusion import StableDiffusion
    from safe_jax.text import tokenizer as tok

    cfg = CONFIGS[name]
    if "preset" in cfg:
        return StableDiffusion.from_pretrained(cfg["preset"], dtype=jnp.float32, seed=seed)
    kw = dict(dtype=jnp.float32, param_dtype=jnp.float32)
    sched = dict(PRESETS["tiny"]["scheduler"])  # SD's schedule, DDIM, leading spacing
    pipe = StableDiffusion(
        unet=UNet2DConditionModel(UNetConfig.from_diffusers(cfg["unet"]), None, None, **kw),
        vae=AutoencoderKL(VAEConfig.from_diffusers(cfg["vae"]), None, **kw),
        text_encoder=clip_text.CLIPTextModel(clip_text.CLIPTextConfig(**cfg["text"]), attention_impl=None, **kw),
        tokenizer=tok.tiny_tokenizer(), schedule=schedulers.ScheduleConfig.from_diffusers(sched),
        scheduler_config=sched)
    return pipe, pipe.init_params(seed)


def make_batch(pipe, batch_size: int, seed: int):
    """Our batch (token ids, subject weights, images in [-1, 1] NHWC) as numpy."""
    import numpy as np

    caps = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch_size)]
    tw = pipe.token_weights([c for c, _ in caps], [s for _, s in caps])
    size = pipe.default_size
    images = np.random.default_rng(seed).uniform(-1, 1, (batch_size, size, size, 3)).astype(np.float32)
    return {"input_ids": np.asarray(tw.ids, np.int32), "token_weights": np.asarray(tw.weights, np.float32),
            "images": images}


def step_config(args, loss: str, j: int):
    from safe_jax.train import step as ts

    return ts.StepConfig(mode="full", loss=loss, cond_dropout=args.cond_dropout, refl_steps=args.refl_steps,
                         refl_step_range=(j, j), ema_decay=0.999 if args.ema else None)


def compile_ours(pipe, params, cfg, batch_np, args):
    """(compiled step, state, frozen, batch, compile seconds)."""
    import jax
    import jax.numpy as jnp

    from safe_jax import sharding
    from safe_jax.train import rewards
    from safe_jax.train import step as ts

    tx = ts.make_optimizer(args.lr, total_steps=1000, schedule="constant", weight_decay=args.weight_decay, clip_norm=1.0)
    reward = rewards.make_reward("brightness") if cfg.loss != "denoising" else None
    state = ts.init_state(jax.tree.map(jnp.copy, params["unet"]), tx, seed=args.seed, ema=args.ema)
    frozen = {"text_encoder": params["text_encoder"], "vae": params["vae"], "unet": {}, "reward": {}}
    batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    t0 = time.perf_counter()
    step = ts.compile_train_step(ts.make_train_step(ts.DiffusionModel.from_modules(pipe.unet, pipe.vae, pipe.schedule), pipe.conditioner, cfg, tx, reward), state, frozen, batch, mesh)
    return step, state, frozen, batch, time.perf_counter() - t0


class TorchSide:
    """The diffusers/PyTorch models loaded from an exported folder, and the two training loops."""

    def __init__(self, folder: Path, args):
        import torch
        from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel

        self.torch, self.args = torch, args
        self.unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32).train()
        self.vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32).eval()
        self.text = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32).eval()
        self.vae.requires_grad_(False)
        self.text.requires_grad_(False)
        sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        self.ddpm = DDPMScheduler.from_config(sched)
        self.ddim = DDIMScheduler.from_config(sched)
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                                     weight_decay=args.weight_decay,
                                     **({"foreach": True} if args.torch_foreach else {}))
        self.ema = [p.detach().clone() for p in self.params] if args.ema else None
        self.gen = torch.Generator().manual_seed(args.seed)

    def set_batch(self, batch_np, empty_ids):
        t = self.torch
        self.ids = t.from_numpy(batch_np["input_ids"]).long()
        self.weights = t.from_numpy(batch_np["token_weights"])
        self.images = t.from_numpy(batch_np["images"].transpose(0, 3, 1, 2).copy())
        self.empty_ids = t.from_numpy(empty_ids).long()

    def conditioning(self):
        """Compel subject weighting, as ours: z_empty + w (z - z_empty), exactly z where w = 1."""
        with self.torch.no_grad():
            z = self.text(self.ids)[0]
            z_empty = self.text(self.empty_ids)[0]
            w = self.weights[..., None]
            return self.torch.where(w == 1, z, z_empty + (z - z_empty) * w), z_empty

    def update(self, loss):
        t = self.torch
        loss.backward()
        t.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            with t.no_grad():
                t._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1 - 0.999)
        return float(loss.detach())

    def denoising_step(self):
        t = self.torch
        context, z_empty = self.conditioning()
        b = self.ids.shape[0]
        if self.args.cond_dropout > 0:
            drop = t.rand(b, 1, 1, generator=self.gen) < self.args.cond_dropout
            context = t.where(drop, z_empty.expand_as(context), context)
        with t.no_grad():
            latents = self.vae.encode(self.images).latent_dist.sample(self.gen) * self.vae.config.scaling_factor
        timesteps = t.randint(0, self.ddpm.config.num_train_timesteps, (b,), generator=self.gen)
        noise = t.randn(latents.shape, generator=self.gen)
        noisy = self.ddpm.add_noise(latents, noise, timesteps)
        pred = self.unet(noisy, timesteps, context).sample
        return self.update(t.nn.functional.mse_loss(pred.float(), noise))

    def refl_step(self, j: int, latent_shape):
        """ImageReward's ReFL (train_refl.py): rollout to j without grad, x0 from step j, decode, reward."""
        t = self.torch
        context, _ = self.conditioning()
        sched = self.ddim
        sched.set_timesteps(self.args.refl_steps)
        latents = t.randn(latent_shape, generator=self.gen) * sched.init_noise_sigma
        with t.no_grad():
            for ts_ in sched.timesteps[:j]:
                out = self.unet(sched.scale_model_input(latents, ts_), ts_, context).sample
                latents = sched.step(out, ts_, latents).prev_sample
        ts_ = sched.timesteps[j]
        out = self.unet(sched.scale_model_input(latents, ts_), ts_, context).sample
        x0 = sched.step(out, ts_, latents).pred_original_sample
        images = (self.vae.decode(x0 / self.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        reward = images.float().mean(dim=(1, 2, 3))
        loss = t.nn.functional.relu(2.0 - reward).mean() * 1e-3
        return self.update(loss)


def forward_check(pipe, params, side: "TorchSide", batch_np):
    """Max |ours - PyTorch| of the text encoder and the UNet on the same inputs: the same weights?"""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    ids = batch_np["input_ids"]
    ours_z = np.asarray(pipe.text_encoder.apply({"params": params["text_encoder"]}, jnp.asarray(ids))["encoded"])
    with torch.no_grad():
        theirs_z = side.text(torch.from_numpy(ids).long())[0].numpy()
    rng = np.random.default_rng(1)
    s = pipe.unet.config.sample_size
    x = rng.standard_normal((ids.shape[0], s, s, 4), dtype=np.float32)
    t = np.full((ids.shape[0],), 500, np.int32)
    ours = np.asarray(jax.jit(pipe.unet.apply)({"params": params["unet"]}, jnp.asarray(x), jnp.asarray(t),
                                                jnp.asarray(ours_z)))
    with torch.no_grad():
        theirs = side.unet(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t).long(),
                           torch.from_numpy(theirs_z)).sample.numpy().transpose(0, 2, 3, 1)
    return float(np.abs(ours_z - theirs_z).max()), float(np.abs(ours - theirs).max()), float(np.abs(theirs).max())


# ------------------------------------------------------------------------------------------ memory
def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return -1


def mem_child(args) -> int:
    """In a fresh process: compile our ReFL step (remat or not), report memory_analysis and peak RSS."""
    import jax

    from safe_jax.sampling.stable_diffusion import StableDiffusion

    folder, remat, b, refl_steps, j = args.mem_child.split("|")
    args.refl_steps = int(refl_steps)
    pipe, params = StableDiffusion.from_pretrained(folder, remat_policy=None if remat == "none" else remat)
    cfg = step_config(args, "refl", int(j))
    step, state, frozen, batch, _ = compile_ours(pipe, params, cfg, make_batch(pipe, int(b), args.seed), args)
    ma = step.memory_analysis()
    out = {}
    if ma is not None:
        out.update(temp=ma.temp_size_in_bytes, argument=ma.argument_size_in_bytes, output=ma.output_size_in_bytes,
                   alias=ma.alias_size_in_bytes)
        out["peak_est"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    ca = step.cost_analysis()
    ca = (ca[0] if ca else {}) if isinstance(ca, (list, tuple)) else (ca or {})
    out["flops"] = float(ca.get("flops", float("nan")))  # remat recomputes: more FLOPs, less memory
    state = jax.block_until_ready(state)
    out["hwm_compile"] = _proc_status("VmHWM")  # peak so far: loading and compiling
    try:  # reset the high-water mark so VmHWM counts the step, not the compilation
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        out["hwm_reset"] = True
    except OSError:
        out["hwm_reset"] = False
    out["rss_before"] = _proc_status("VmRSS")
    for _ in range(2):
        state, metrics = step(state, frozen, batch)
        jax.block_until_ready((state, metrics))
    out["rss_peak"] = _proc_status("VmHWM")
    # ru_maxrss would be no use here: Linux carries the forking parent's RSS into it across exec.
    print("MEM " + json.dumps(out), flush=True)
    return 0


def run_mem_child(folder, remat, b, refl_steps, j, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--mem-child", f"{folder}|{remat}|{b}|{refl_steps}|{j}",
           "--cond-dropout", str(args.cond_dropout), "--seed", str(args.seed)] + (["--ema"] if args.ema else [])
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("MEM ")]
    if res.returncode or not line:
        print(f"memory run ({remat}) failed, rc={res.returncode}:\n{res.stderr[-3000:]}")
        return None
    out = json.loads(line[0][4:])
    print(f"  remat={remat:5s} batch={b}: " + "  ".join(
        f"{k} {v / 2**20:.1f} MiB" for k, v in out.items() if isinstance(v, int) and not isinstance(v, bool))
        + f"  {out.get('flops', float('nan')) / 1e9:.1f} GFLOP"
        + f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
    return out


def checkpoint_control():
    """XLA temp bytes of grad of a 16-layer MLP with and without jax.checkpoint on each layer: does
    this backend turn remat into memory savings at all? (A control for the ReFL figures.)"""
    import jax
    import jax.numpy as jnp

    def loss(ws, x, remat):
        layer = lambda w, x: jnp.tanh(jnp.tanh(x @ w) @ w)
        layer = jax.checkpoint(layer) if remat else layer
        for w in ws:
            x = layer(w, x)
        return jnp.sum(x)

    ws, x = [jax.ShapeDtypeStruct((512, 512), jnp.float32)] * 16, jax.ShapeDtypeStruct((4096, 512), jnp.float32)
    temp = lambda r: jax.jit(jax.grad(lambda w, x: loss(w, x, r))).lower(ws, x).compile().memory_analysis()
    return temp(True).temp_size_in_bytes, temp(False).temp_size_in_bytes


# ------------------------------------------------------------------------------------------ main
def stats(got, quiet):
    ts_ = [t for t, _, _ in got]
    q = [t for t, l, _ in got if l < quiet]
    return statistics.median(ts_), (statistics.median(q) if q else float("nan")), min(ts_), len(q), len(ts_)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpus:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[-args.cpus:])
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
    if args.mem_child:
        return mem_child(args)

    import jax
    import numpy as np
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    print(f"python {sys.version.split()[0]}  jax {jax.__version__}  torch {torch.__version__}  "
          f"device {jax.devices()[0]}  XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"torch threads {torch.get_num_threads()}  cores usable {sorted(os.sched_getaffinity(0))}  "
          f"EMA {'on' if args.ema else 'off'}  cond_dropout {args.cond_dropout}  AdamW lr {args.lr} "
          f"wd {args.weight_decay}  clip 1.0  fp32")
    table = []  # (config, case, ours stats, torch stats)
    mem_rows = []
    tmp = tempfile.TemporaryDirectory(prefix="safe_jax_bench_")
    for name in args.configs:
        cfg = CONFIGS[name]
        b = args.batch or cfg["batch"]
        j = args.refl_step if args.refl_step is not None else cfg["refl_step"]
        if args.quick:
            j = min(j, args.refl_steps // 2)
        if not 0 <= j < args.refl_steps:
            raise SystemExit(f"--refl-step {j} must be in [0, {args.refl_steps})")
        from safe_jax.sampling.stable_diffusion import StableDiffusion

        pipe0, params0 = build_ours(name, args.seed)
        folder = Path(tmp.name) / name
        pipe0.save_pretrained(params0, folder)
        del params0
        pipe, params = StableDiffusion.from_pretrained(folder)
        side = TorchSide(folder, args)
        n_ours = sum(x.size for x in jax.tree.leaves(params["unet"]))
        n_torch = sum(p.numel() for p in side.params)
        batch_np = make_batch(pipe, b, args.seed)
        size, s = pipe.default_size, pipe.unet.config.sample_size
        print(f"\n===== config {name}: UNet {n_ours / 1e6:.2f}M params (PyTorch {n_torch / 1e6:.2f}M), "
              f"batch {b}, images {size}x{size}, latents {s}x{s}x4, ReFL {args.refl_steps} DDIM steps, j = {j}")
        if n_ours != n_torch:
            raise SystemExit("parameter counts differ: not the same model")
        side.set_batch(batch_np, np.asarray(pipe.tokenize([""])))
        ez, eu, scale = forward_check(pipe, params, side, batch_np)
        print(f"forward check: text encoder max|diff| {ez:.1e}; UNet max|diff| {eu:.1e} (output scale {scale:.2f})")

        for case in ("denoising", "refl"):
            if case not in args.cases:
                continue
            scfg = step_config(args, case, j)
            step, state, frozen, batch, t_compile = compile_ours(pipe, params, scfg, batch_np, args)
            print(f"--- {case}: our step compiled in {t_compile:.1f} s", flush=True)
            box = {"state": state}

            def run_ours():
                box["state"], m = step(box["state"], frozen, batch)
                jax.block_until_ready((box["state"], m))
                return float(m["loss"])

            run_torch = side.denoising_step if case == "denoising" else (
                lambda: side.refl_step(j, (b, 4, s, s)))
            sides = {f"ours {case}": run_ours, f"PyTorch {case}": run_torch}
            for label, fn in sides.items():
                for i in range(args.warmup):
                    t0 = time.perf_counter()
                    loss = fn()
                    print(f"warm-up {label:18s} {i}: {time.perf_counter() - t0:7.3f} s  loss {loss:.6g}", flush=True)
            samples = interleave(sides, args)
            table.append((name, case, stats(samples[f"ours {case}"], args.quiet),
                          stats(samples[f"PyTorch {case}"], args.quiet)))
            del step, state, box

        if "memory" in args.cases:
            mb = args.mem_batch or (b if args.quick else cfg["mem_batch"])
            print(f"--- memory of our ReFL step (fresh process each, batch {mb}, j = {j}):", flush=True)
            got = {r: run_mem_child(folder, r, mb, args.refl_steps, j, args) for r in ("full", "none")}
            mem_rows.append((name, mb, got["full"], got["none"]))
        del side, pipe, params

    # ---- summary
    print("\n== summary: seconds per training step (median / quiet median / min; n quiet of n) ==")
    print(f"{'config':6s} {'step':10s} {'ours':>26s} {'PyTorch':>26s}   {'ours/PyTorch':>22s}  goal <= {GOAL_RATIO:.2f}")
    contended = False
    for name, case, o, t in table:
        fmt = lambda x: f"{x[0]:7.3f}/{x[1]:7.3f}/{x[2]:7.3f} {x[3]}/{x[4]}"
        r, rq = o[0] / t[0], o[1] / t[1]
        if o[3] and t[3]:  # judge by the quiet medians when both sides have quiet steps
            verdict = "met (quiet)" if rq <= GOAL_RATIO else "NOT met (quiet)"
        else:
            contended = True
            verdict = ("met" if r <= GOAL_RATIO else "NOT met") + " (contended: unreliable)"
        print(f"{name:6s} {case:10s} {fmt(o):>26s} {fmt(t):>26s}   {r:5.2f}x (quiet {rq:5.2f}x)  {verdict}")
    if contended:
        print("NOTE: other processes used these cores during the steps. PyTorch's OpenMP threads slow down many-fold "
              "under contention (ours far less), so plain medians flatter us; rerun with --cpus 1.")
    if mem_rows:
        print(f"\n== peak memory of our ReFL step, remat 'full' vs none (MiB; goal: remat <= {GOAL_REMAT:.2f}x) ==")
        print(f"{'config':6s} {'batch':>5s} {'measure':28s} {'remat':>9s} {'none':>9s}  ratio")
        for name, mb, full, none in mem_rows:
            if not (full and none):
                print(f"{name:6s} {mb:5d} (a memory run failed)")
                continue
            rows = [("XLA temp", "temp"), ("XLA args+out-alias+temp", "peak_est"),
                    ("peak RSS during steps", "rss_peak"), ("peak RSS - RSS before", None),
                    ("peak RSS incl. compile", "hwm_compile")]
            for label, key in rows:
                if key is None:
                    a, c = full["rss_peak"] - full["rss_before"], none["rss_peak"] - none["rss_before"]
                else:
                    if key not in full or key not in none:
                        continue
                    a, c = full[key], none[key]
                ratio = a / c if c > 0 else float("nan")
                verdict = "met" if ratio <= GOAL_REMAT else "NOT met"
                print(f"{name:6s} {mb:5d} {label:28s} {a / 2**20:9.1f} {c / 2**20:9.1f}  {ratio:5.2f}x {verdict}")
            f_full, f_none = full.get("flops", float("nan")), none.get("flops", float("nan"))
            print(f"{name:6s} {mb:5d} {'XLA GFLOP/step (not memory)':28s} {f_full / 1e9:9.1f} {f_none / 1e9:9.1f}  "
                  f"{f_full / f_none:5.2f}x (> 1: remat recomputes)")
            if not full.get("hwm_reset"):
                print("  (VmHWM could not be reset: 'peak RSS' includes compilation)")
        a, c = checkpoint_control()
        print(f"{'control':6s} {'':5s} {'jax.checkpoint MLP, XLA temp':28s} {a / 2**20:9.1f} {c / 2**20:9.1f}  {a / c:5.2f}x"
              f"  (backend {jax.default_backend()}: {'remat saves memory here' if a < 0.8 * c else 'remat buys no memory on this backend'})")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
