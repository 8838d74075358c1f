"""Throughput and MFU of our SAFE denoising train step for SD 1.5 at 512x512 and SDXL at 1024x1024
in bf16, on a GPU/TPU.

The step is the real one (``make_train_step`` + ``compile_train_step``: subject-weighted CLIP
conditioning, conditioning dropout, VAE encode unless latents are given, epsilon MSE, AdamW with
clipping, EMA unless --no-ema, NaN guard), on a mesh of all local devices (data parallel).

    python benchmarks/gpu_train_step.py                          # sd15 preset (random weights), full UNet, batch 8
    python benchmarks/gpu_train_step.py --mode lora --batch 16   # LoRA rank 4 on the attention projections
    python benchmarks/gpu_train_step.py --model /ckpt/sd15 --input images --attention cudnn --remat
    python benchmarks/gpu_train_step.py --quick                  # tiny preset on any backend (CPU): a smoke run
    python benchmarks/gpu_train_step.py --model sdxl --mode lora --batch 4 --remat --fsdp 8   # SDXL 1024², LoRA
    python benchmarks/gpu_train_step.py --model sdxl --batch 4 --remat --fsdp 8                # SDXL full, FSDP
    python benchmarks/gpu_train_step.py --quick --model tiny-xl --fsdp 1                       # SDXL's road on CPU

The image size defaults to the model's own (512 for SD 1.5, 1024 for SDXL). SDXL's step also carries
its pooled text embedding and micro-conditioning time ids, as training does. --fsdp N shards
parameters, optimizer state and frozen encoders over N devices (the rest of the mesh is data).

Reported: median seconds per step (over --repeats groups of --steps back-to-back steps, so dispatch
overlaps as in training), images/s, and MFU = FLOPs per step / (step time x peak dense bf16 FLOP/s
of the devices). FLOPs per step are XLA's ``cost_analysis()`` of the compiled step. With --remat
that count includes the recomputation (it gives HFU); for MFU it is scaled by the ratio of a
remat-free lowering's count to the remat lowering's. XLA does not count the FLOPs inside cuDNN's
fused attention custom calls: when the program has them (--attention cudnn), the attention FLOPs
(QK^T and PV of every self- and cross-attention, x3 for forward + backward) are added
analytically. Peaks come from a table by ``device_kind`` (--peak-tflops overrides); on CPU, MFU
is n/a unless --peak-tflops is given. Device memory: XLA's memory_analysis and, where the backend
has them, the device's peak_bytes_in_use.
Goal: MFU >= 50% on one H100.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

GOAL_MFU = 0.50

# Dense bf16 peak FLOP/s by device_kind substring (first match wins; the H100 PCIe before "H100").
PEAK_BF16 = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),   # SXM
    ("A100", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5p", 459e12), ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12), ("TPU7x", None),
)

CAPTIONS = [("Boris Johnson on Tower Bridge at the unveiling of the Olympic rings", ["Boris Johnson"]),
            ("Firefighters pump water from a flooded street in Leeds", ["Firefighters"])]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a diffusers folder or a preset (default sd15; --quick: tiny)")
    p.add_argument("--mode", choices=("full", "lora"), default="full", help="train the whole UNet or LoRA")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank")
    p.add_argument("--batch", type=int, default=None, help="global batch size (default 8; --quick: 2)")
    p.add_argument("--resolution", type=int, default=None, help="image size (default: the model's, 512 / 1024)")
    p.add_argument("--fsdp", type=int, default=1, help="devices on the mesh's FSDP axis (the rest: data)")
    p.add_argument("--input", choices=("latents", "images"), default="latents",
                   help="batch holds precomputed latents [B, H/8, W/8, 4] or images [B, H, W, 3] (VAE encode in the step)")
    p.add_argument("--attention", choices=("default", "xla", "cudnn"), default="default",
                   help="attention_impl of every model (default: JAX chooses)")
    p.add_argument("--remat", nargs="?", const="full", default=None,
                   help="UNet remat policy ('full' when given alone, or a jax.checkpoint_policies name)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16", help="compute dtype")
    p.add_argument("--no-ema", action="store_true", help="no EMA of the trained weights")
    p.add_argument("--steps", type=int, default=10, help="back-to-back steps per timed group")
    p.add_argument("--repeats", type=int, default=5, help="timed groups (the median is over groups)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after the compile")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s per device, in TFLOP/s")
    p.add_argument("--quick", action="store_true", help="tiny preset, batch 2, few steps: runs anywhere (CPU)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.model = args.model or "tiny"
        args.batch = args.batch or 2
        args.steps, args.repeats, args.warmup = min(args.steps, 2), min(args.repeats, 2), min(args.warmup, 1)
    args.model = args.model or "sd15"
    args.batch = args.batch or 8
    return args


def peak_flops(device_kind: str) -> float | None:
    for key, peak in PEAK_BF16:
        if key.lower() in device_kind.lower():
            return peak
    return None


def flops_of(cost) -> float:
    """The 'flops' of a cost_analysis() result: a dict, a list of dicts (one per program), or None."""
    if cost is None:
        return float("nan")
    if isinstance(cost, dict):
        cost = [cost]
    values = [float(c["flops"]) for c in cost if c and "flops" in c]
    return sum(values) if values else float("nan")


def attention_flops(unet_config, batch: int, latent: int, context_len: int = 77) -> float:
    """Forward FLOPs of the attention products (QK^T and PV) of every transformer block of the UNet."""
    cfg = unet_config
    n = len(cfg.block_out_channels)
    total = 0.0

    def block(level, count):
        nonlocal total
        tokens = (latent // 2 ** level) ** 2
        c = cfg.block_out_channels[level]
        depth = cfg.transformer_layers_per_block[level] * count
        total += depth * (4.0 * batch * tokens * tokens * c + 4.0 * batch * tokens * context_len * c)

    for i, kind in enumerate(cfg.down_block_types):
        if kind.startswith("CrossAttn"):
            block(i, cfg.layers_per_block)
    block(n - 1, 1)  # the mid block (always cross-attention here)
    for i, kind in enumerate(cfg.up_block_types):
        if kind.startswith("CrossAttn"):
            block(n - 1 - i, cfg.layers_per_block + 1)
    return total


def main(argv=None) -> int:
    args = parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from safe_jax import sharding
    from safe_jax.sampling.stable_diffusion import StableDiffusion
    from safe_jax.train import lora
    from safe_jax.train import step as ts

    dtype = getattr(jnp, args.dtype)
    impl = None if args.attention == "default" else args.attention
    devices = jax.devices()
    kind = devices[0].device_kind
    print(f"jax {jax.__version__}  backend {jax.default_backend()}  {len(devices)} x {kind}")

    t0 = time.perf_counter()
    pipe, params = StableDiffusion.from_pretrained(args.model, dtype=dtype, attention_impl=impl,
                                                   remat_policy=args.remat, seed=args.seed)
    size = args.resolution or pipe.default_size
    f = pipe.vae.config.downscale
    latent = size // f
    n_unet = sum(x.size for x in jax.tree.leaves(params["unet"]))
    print(f"model {args.model}: UNet {n_unet / 1e6:.0f}M params, {args.dtype} compute / fp32 params, "
          f"{size}x{size} images -> {latent}x{latent}x4 latents, loaded in {time.perf_counter() - t0:.1f} s")

    cfg = ts.StepConfig(mode=args.mode, loss="denoising", ema_decay=None if args.no_ema else 0.999)
    tx = ts.make_optimizer(1e-5 if args.mode == "full" else 1e-4, total_steps=10_000, schedule="constant")
    if args.mode == "lora":
        trainable = lora.init_lora(params["unet"], jax.random.key(args.seed), rank=args.rank)
        frozen_unet = params["unet"]
    else:
        trainable, frozen_unet = params["unet"], {}
    n_train = sum(x.size for x in jax.tree.leaves(trainable))
    state = ts.init_state(trainable, tx, seed=args.seed, ema=not args.no_ema)
    frozen = {"text_encoder": pipe.conditioner.text_params(params), "vae": params["vae"], "unet": frozen_unet,
              "reward": {}}

    b = args.batch
    caps = [CAPTIONS[i % len(CAPTIONS)] for i in range(b)]
    tw = pipe.token_weights([c for c, _ in caps], [s for _, s in caps])
    rng = np.random.default_rng(args.seed)
    batch = {"input_ids": jnp.asarray(tw.ids), "token_weights": jnp.asarray(tw.weights)}
    if pipe.is_xl:  # SDXL's micro-conditioning: original size, crop top-left, target size
        batch["time_ids"] = jnp.asarray(np.tile([size, size, 0, 0, size, size], (b, 1)), jnp.float32)
    if args.input == "latents":
        batch["latents"] = jnp.asarray(rng.standard_normal((b, latent, latent, 4), np.float32)
                                       * pipe.vae.config.scaling_factor * 5)
    else:
        batch["images"] = jnp.asarray(rng.uniform(-1, 1, (b, size, size, 3)).astype(np.float32))

    mesh = sharding.make_mesh(data=-1, fsdp=args.fsdp)
    if b % mesh.size:
        raise SystemExit(f"batch {b} is not a multiple of the {mesh.size} devices")
    step_fn = ts.make_train_step(ts.DiffusionModel.from_modules(pipe.unet, pipe.vae, pipe.schedule), pipe.conditioner, cfg, tx)
    t0 = time.perf_counter()
    compiled = ts.compile_train_step(step_fn, state, frozen, batch, mesh)
    t_compile = time.perf_counter() - t0
    state = jax.device_put(state, sharding.shardings_for(state, mesh))
    frozen = jax.device_put(frozen, sharding.shardings_for(frozen, mesh))
    batch = jax.device_put(batch, jax.tree.map(lambda _: sharding.batch_sharding(mesh), batch))
    print(f"mode {args.mode} ({n_train / 1e6:.2f}M trainable), batch {b} {args.input}, attention "
          f"{args.attention}, remat {args.remat or 'none'}, EMA {'off' if args.no_ema else 'on'}, mesh "
          f"{dict(mesh.shape)}; "
          f"compiled in {t_compile:.1f} s")

    # FLOPs: the compiled program's (hardware FLOPs, recomputation included) and, for MFU, a
    # remat-free lowering's (model FLOPs).
    hw_flops = flops_of(compiled.cost_analysis())
    model_flops = hw_flops
    if args.remat:
        plain = dataclasses.replace(pipe, unet=pipe.unet.clone(remat_policy=None))
        lower = lambda p: jax.jit(ts.make_train_step(ts.DiffusionModel.from_modules(p.unet, p.vae, p.schedule), p.conditioner, cfg, tx)).lower(state, frozen, batch).cost_analysis()
        # Both counted before optimisation (the same basis), their ratio scales the compiled count.
        model_flops = hw_flops * flops_of(lower(plain)) / flops_of(lower(pipe))
    hlo = compiled.as_text() or ""
    attn_added = 0.0
    if "cudnn$fmha" in hlo or "__cudnn$fmha" in hlo:
        attn_added = 3.0 * attention_flops(pipe.unet.config, b, latent)
        print(f"cuDNN fused attention in the program: adding {attn_added / 1e12:.2f} TFLOP of attention per step")
    hw_flops += attn_added
    model_flops += attn_added
    ma = compiled.memory_analysis()
    if ma is not None:
        print(f"XLA memory: arguments {ma.argument_size_in_bytes / 2**30:.2f} GiB, temp {ma.temp_size_in_bytes / 2**30:.2f} GiB, "
              f"output {ma.output_size_in_bytes / 2**30:.2f} GiB (aliased {ma.alias_size_in_bytes / 2**30:.2f} GiB)")

    for i in range(args.warmup):
        t0 = time.perf_counter()
        state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready(metrics)
        print(f"warm-up {i}: {time.perf_counter() - t0:.3f} s  loss {float(metrics['loss']):.4f}  "
              f"finite {bool(metrics['finite'])}")
    times = []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready((state, metrics))
        times.append((time.perf_counter() - t0) / args.steps)
        print(f"group {r}: {times[-1] * 1e3:8.1f} ms/step  loss {float(metrics['loss']):.4f}", flush=True)
    if not bool(metrics["finite"]):
        print("WARNING: the last step's loss or gradient was not finite (update skipped)")

    med = statistics.median(times)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (
        peak_flops(kind) if jax.default_backend() != "cpu" else None)
    n_dev = mesh.size
    mem = {}
    try:
        mem = devices[0].memory_stats() or {}
    except Exception:  # not every backend has memory stats
        pass
    print("\n== summary ==")
    print(f"device            {n_dev} x {kind}" + (f" (peak {peak / 1e12:.4g} TFLOP/s each)" if peak else ""))
    print(f"step time         {med * 1e3:.1f} ms (median of {args.repeats} x {args.steps} steps; min {min(times) * 1e3:.1f})")
    print(f"throughput        {b / med:.2f} images/s")
    print(f"FLOPs per step    {model_flops / 1e12:.3f} TFLOP model"
          + (f", {hw_flops / 1e12:.3f} TFLOP executed (remat)" if args.remat else "")
          + f"  -> {model_flops / med / n_dev / 1e12:.4g} TFLOP/s per device")
    if "peak_bytes_in_use" in mem:
        print(f"device memory     peak {mem['peak_bytes_in_use'] / 2**30:.2f} GiB of {mem.get('bytes_limit', 0) / 2**30:.1f} GiB")
    if peak:
        mfu = model_flops / (med * peak * n_dev)
        print(f"MFU               {mfu:.1%}" + (f"   HFU {hw_flops / (med * peak * n_dev):.1%}" if args.remat else "")
              + f"   goal >= {GOAL_MFU:.0%} on one H100: {'met' if mfu >= GOAL_MFU else 'NOT met'}")
    else:
        print(f"MFU               n/a (no peak FLOP/s for {kind!r} on {jax.default_backend()}; pass --peak-tflops)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
