"""Time one UNet training step (forward, backward, AdamW update): safe-jax (Flax) vs diffusers (PyTorch).

Both sides get the same config, the same weights (PyTorch's random init copied into ours), the same
batch, timesteps and target, and run on the same machine in one process, alternating rounds so load
from other work hits both sides alike. It prints seconds/step of each side and the ratio ours/PyTorch.

    python benchmarks/unet_train_step.py                 # the issue's 142M-parameter UNet, 32x32, batch 2
    python benchmarks/unet_train_step.py --quick         # tiny config: checks the script works (~1.5 min)
    python benchmarks/unet_train_step.py --profile       # also forward-only and forward+backward per side
    python benchmarks/unet_train_step.py --cpus 1        # one core each: per-core efficiency, robust to load
    python benchmarks/unet_train_step.py --min-quiet 4   # add rounds until each side has 4 undisturbed steps
    python benchmarks/unet_train_step.py --only jax --xla-flags=--xla_cpu_use_onednn=true
    PYTHONPATH=/tmp/x python benchmarks/unet_train_step.py --unet-module my_copy.models.unet

Noise: every step records how much CPU other processes used on our cores meanwhile. On a shared
machine PyTorch's OpenMP threads slow down 10-20x when another process takes a core (ours about 2x),
so the plain median is meaningless there: quote the "quiet median" (steps where others used < --quiet
of the cores) or run with --cpus 1. XLA_FLAGS must be set before JAX starts, so --xla-flags is
appended to the environment's XLA_FLAGS before jax is imported (unknown flags abort XLA).
Loss: MSE between the UNet output and a fixed random (epsilon-style) target; timesteps fixed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# The issue's config: SD1.5's layout at block_out_channels (128, 256, 512, 512): 142M parameters.
FULL_CONFIG = dict(
    sample_size=32, in_channels=4, out_channels=4,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, attention_head_dim=8,
    cross_attention_dim=768, norm_num_groups=32,
)
QUICK_CONFIG = dict(
    FULL_CONFIG, block_out_channels=[32, 64], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], attention_head_dim=[2, 4], cross_attention_dim=32,
    norm_num_groups=8, layers_per_block=1,
)


class OtherLoad:
    """CPU time used by *other* processes, on the cores this process may run on, while a block runs,
    as a fraction of those cores (Linux /proc; nan elsewhere or when no clock tick passed).

    The machine may be shared; a step during which others used our cores is not comparable.
    """

    def __enter__(self):
        self.a = self._read()
        return self

    def __exit__(self, *exc):
        b = self._read()
        if self.a is None or b is None:
            self.value = float("nan")
        else:
            busy, total, own = (y - x for x, y in zip(self.a, b))  # all in clock ticks
            self.value = max(0.0, busy - own) / total if total else float("nan")
        return False

    @staticmethod
    def _read():
        try:
            cores = {f"cpu{i}" for i in os.sched_getaffinity(0)}
            busy = total = 0
            with open("/proc/stat") as f:
                for line in f:
                    name, *v = line.split()
                    if name in cores:
                        v = [int(x) for x in v[:8]]
                        total += sum(v)
                        busy += sum(v) - v[3] - v[4]  # minus idle and iowait
            with open("/proc/self/stat") as f:
                st = f.read().rsplit(")", 1)[1].split()
            return busy, total, int(st[11]) + int(st[12])  # utime + stime of this process
        except (OSError, ValueError, IndexError, AttributeError):
            return None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=None, help="batch size (default 2; --quick: 1)")
    p.add_argument("--latent", type=int, default=None, help="latent height=width (default 32; --quick: 16)")
    p.add_argument("--context-len", type=int, default=77)
    p.add_argument("--steps", type=int, default=5, help="timed steps per side per round")
    p.add_argument("--repeats", type=int, default=3, help="rounds, alternating ours / PyTorch")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side (the first compiles)")
    p.add_argument("--quick", action="store_true", help="small config, few steps: a smoke run")
    p.add_argument("--only", choices=("both", "jax", "torch"), default="both")
    p.add_argument("--profile", action="store_true",
                   help="also time forward-only and forward+backward on each side, and print XLA's FLOP count")
    p.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS before jax is imported")
    p.add_argument("--matmul-precision", default=None,
                   help="jax.default_matmul_precision for our step (e.g. 'default', 'high', 'highest')")
    p.add_argument("--attention-impl", default="none", choices=("none", "xla"),
                   help="our attention_impl ('none' lets JAX choose)")
    p.add_argument("--remat", default=None, help="our remat_policy (e.g. 'full', 'dots_saveable')")
    p.add_argument("--unet-module", default="safe_jax.models.unet",
                   help="module providing UNet2DConditionModel and UNetConfig (to time an experimental copy)")
    p.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--cpus", type=int, default=None,
                   help="pin the process to this many cores (sched_setaffinity) before JAX and torch start; "
                        "both then use that many threads. --cpus 1 compares per-core efficiency, and is far "
                        "less disturbed by other work on a shared machine than torch's OpenMP threads are")
    p.add_argument("--torch-foreach", action="store_true", help="torch AdamW(foreach=True)")
    p.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay on both sides")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", type=float, default=0.10,
                   help="a step counts as quiet when other processes used less than this fraction of the CPUs")
    p.add_argument("--min-quiet", type=int, default=0,
                   help="after --repeats rounds, keep going until every case has this many quiet steps ...")
    p.add_argument("--max-rounds", type=int, default=12, help="... or this many rounds in all")
    p.add_argument("--no-check", action="store_true", help="skip the forward-output comparison of the two sides")
    args = p.parse_args(argv)
    if args.batch is None:
        args.batch = 1 if args.quick else 2
    if args.latent is None:
        args.latent = 16 if args.quick else 32
    if args.quick:
        args.context_len = min(args.context_len, 8)
        args.steps, args.repeats, args.warmup = min(args.steps, 2), min(args.repeats, 2), 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpus:
        allowed = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, allowed[-args.cpus:])
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()

    import importlib

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    from safe_jax.io.convert import torch_to_flax

    unet_module = importlib.import_module(args.unet_module)
    UNet2DConditionModel, UNetConfig = unet_module.UNet2DConditionModel, unet_module.UNetConfig

    cfg_dict = dict(QUICK_CONFIG if args.quick else FULL_CONFIG, sample_size=args.latent)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    B, S, L, D = args.batch, args.latent, args.context_len, cfg_dict["cross_attention_dim"]

    print(f"python {sys.version.split()[0]}  jax {jax.__version__}  torch {torch.__version__}  ours: {args.unet_module}")
    print(f"JAX device: {jax.devices()[0]} ({jax.default_backend()})   XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"torch.get_num_threads()={torch.get_num_threads()}   os.cpu_count()={os.cpu_count()}   "
          f"cores this process may use: {sorted(os.sched_getaffinity(0))}")
    print(f"config: block_out_channels={cfg_dict['block_out_channels']} cross_attention_dim={D} "
          f"batch={B} latents={S}x{S}x4 context=[{B},{L},{D}] fp32")

    # ---- PyTorch model; its random init is the weights for both sides.
    torch.manual_seed(args.seed)
    tmodel = TorchUNet(**cfg_dict).float()
    tmodel.train()
    n_torch = sum(p.numel() for p in tmodel.parameters())

    rng = np.random.default_rng(args.seed)
    sample = rng.standard_normal((B, 4, S, S), dtype=np.float32)      # NCHW
    target = rng.standard_normal((B, 4, S, S), dtype=np.float32)
    context = rng.standard_normal((B, L, D), dtype=np.float32)
    timesteps = rng.integers(0, 1000, size=(B,)).astype(np.int32)

    # ---- Ours, with PyTorch's weights.
    config = UNetConfig.from_diffusers(cfg_dict)
    model = UNet2DConditionModel(config, attention_impl=None if args.attention_impl == "none" else args.attention_impl,
                                 remat_policy=args.remat)
    j_sample = jnp.asarray(sample.transpose(0, 2, 3, 1))             # NHWC
    j_target = jnp.asarray(target.transpose(0, 2, 3, 1))
    j_context, j_t = jnp.asarray(context), jnp.asarray(timesteps)
    abstract = jax.eval_shape(model.init, jax.random.key(0), j_sample, j_t, j_context)["params"]
    state = {k: v.detach().cpu().numpy() for k, v in tmodel.state_dict().items()}
    params = jax.tree.map(jnp.asarray, torch_to_flax(state, abstract, what="unet"))
    del state
    n_jax = sum(x.size for x in jax.tree.leaves(params))
    print(f"parameters: ours {n_jax:,}  PyTorch {n_torch:,}  ({'equal' if n_jax == n_torch else 'DIFFERENT'}, "
          f"{n_jax / 1e6:.1f}M)")
    if n_jax != n_torch:
        raise SystemExit("parameter counts differ: not the same model")

    t_sample, t_target = torch.from_numpy(sample), torch.from_numpy(target)
    t_context, t_t = torch.from_numpy(context), torch.from_numpy(timesteps).long()

    # ---- Check the two sides compute the same function before timing them.
    if not args.no_check:
        with torch.no_grad():
            t_out = tmodel(t_sample, t_t, t_context).sample.numpy()
        j_out = np.asarray(jax.jit(model.apply)({"params": params}, j_sample, j_t, j_context)).transpose(0, 3, 1, 2)
        err = float(np.max(np.abs(t_out - j_out)))
        print(f"forward check: max|ours - PyTorch| = {err:.2e} (output scale {float(np.abs(t_out).max()):.2f}); "
              f"loss ours {float(np.mean((j_out - target) ** 2)):.6f} PyTorch {float(np.mean((t_out - target) ** 2)):.6f}")

    # ---- Our step.
    precision = args.matmul_precision

    def loss_fn(p, x, t, c, y):
        out = model.apply({"params": p}, x, t, c)
        return jnp.mean(jnp.square(out - y))

    tx = optax.adamw(args.lr, weight_decay=args.weight_decay)

    def train_step(p, opt_state, x, t, c, y):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, t, c, y)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    def jit(fn, **kw):
        f = jax.jit(fn, **kw)
        if precision is None:
            return f

        def wrapped(*a):
            with jax.default_matmul_precision(precision):
                return f(*a)
        return wrapped

    jstep = jit(train_step, donate_argnums=(0, 1))
    opt_state = tx.init(params)
    batch = (j_sample, j_t, j_context, j_target)

    def run_jax():
        nonlocal params, opt_state
        params, opt_state, loss = jstep(params, opt_state, *batch)
        jax.block_until_ready((params, opt_state, loss))
        return float(loss)

    # ---- PyTorch step.
    topt = torch.optim.AdamW(tmodel.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                             **({"foreach": True} if args.torch_foreach else {}))

    def run_torch():
        topt.zero_grad(set_to_none=True)
        out = tmodel(t_sample, t_t, t_context).sample
        loss = torch.nn.functional.mse_loss(out, t_target)
        loss.backward()
        topt.step()
        return float(loss.detach())

    sides = {"ours": run_jax, "PyTorch": run_torch}
    if args.only == "jax":
        sides.pop("PyTorch")
    elif args.only == "torch":
        sides.pop("ours")

    # Warm-up: the first JAX call compiles; torch's first calls set up oneDNN/MKL kernels.
    for name, fn in sides.items():
        for i in range(args.warmup):
            t0 = time.perf_counter()
            loss = fn()
            print(f"warm-up {name:8s} step {i}: {time.perf_counter() - t0:7.3f} s  loss {loss:.6f}"
                  + ("  (includes compile)" if i == 0 and name == "ours" else ""))

    print(f"\n== one training step (forward + backward + AdamW): {args.repeats} rounds x {args.steps} steps per side ==")
    samples = interleave(sides, args)
    summarize(samples, args, "ours", "PyTorch", goal=True)

    if args.profile:
        profile(args, model, params, batch, tmodel, (t_sample, t_t, t_context, t_target), jit, loss_fn, train_step, tx)
    return 0


def timed(fn):
    """(wall seconds, fraction of the CPUs other processes used meanwhile, this process's CPU seconds)."""
    with OtherLoad() as load:
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
    return dt, load.value, dc


def interleave(cases, args):
    """Rounds of args.steps timed calls per case, the order reversed every other round."""
    samples = {name: [] for name in cases}
    r = 0
    while r < args.repeats or (
            r < args.max_rounds and any(sum(l < args.quiet for _, l, _ in got) < args.min_quiet
                                        for got in samples.values())):
        if r == args.repeats:
            print(f"(continuing until every case has {args.min_quiet} quiet steps, at most {args.max_rounds} rounds)")
        order = list(cases.items()) if r % 2 == 0 else list(cases.items())[::-1]
        for name, fn in order:
            got = [timed(fn) for _ in range(args.steps)]
            samples[name] += got
            print(f"round {r} {name:20s}: median {statistics.median(t for t, _, _ in got):7.3f} s  "
                  f"[{', '.join(f'{t:.3f}' for t, _, _ in got)}]  other load "
                  f"[{', '.join('?' if l != l else f'{l:.0%}' for _, l, _ in got)}]", flush=True)
        r += 1
    return samples


def summarize(samples, args, ours, theirs, goal=False):
    """Median of all steps, median of the quiet steps (others used < --quiet of the CPUs), min.

    Also this process's CPU seconds per step (median over quiet steps, else all): the work done,
    including any spinning of idle worker threads.
    """
    stats = {}
    for name, got in samples.items():
        ts = [t for t, _, _ in got]
        quiet = [t for t, l, _ in got if l < args.quiet]
        cpu = [c for _, l, c in got if l < args.quiet] or [c for _, _, c in got]
        stats[name] = (statistics.median(ts), statistics.median(quiet) if quiet else float("nan"), min(ts))
        print(f"{name:20s}: median {stats[name][0]:7.3f} s   quiet median {stats[name][1]:7.3f} s "
              f"(n={len(quiet)}/{len(ts)})   min {stats[name][2]:7.3f} s   CPU {statistics.median(cpu):6.2f} s/step")
    if ours in stats and theirs in stats:
        (a, aq, am), (b, bq, bm) = stats[ours], stats[theirs]
        print(f"ratio {ours}/{theirs}: median {a / b:.2f}x   quiet median {aq / bq:.2f}x   min {am / bm:.2f}x"
              + ("   (goal <= 0.80)" if goal else ""))


def profile(args, model, params, batch, tmodel, tbatch, jit, loss_fn, train_step, tx):
    """Forward-only and forward+backward on each side, interleaved; and XLA's own cost estimate."""
    import jax
    import torch

    x, t, c, y = batch
    tx_, tt, tc, ty = tbatch
    fwd = jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))
    fwd_bwd = jit(jax.value_and_grad(loss_fn))

    def t_fwd():
        with torch.no_grad():
            tmodel(tx_, tt, tc)

    def t_fwd_bwd():
        tmodel.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(tmodel(tx_, tt, tc).sample, ty).backward()

    cases = {
        "ours forward": lambda: jax.block_until_ready(fwd(params, x, t, c)),
        "PyTorch forward": t_fwd,
        "ours fwd+bwd": lambda: jax.block_until_ready(fwd_bwd(params, x, t, c, y)),
        "PyTorch fwd+bwd": t_fwd_bwd,
    }
    for fn in cases.values():  # compile / warm up
        fn()
    print(f"\n== profile: forward only (PyTorch under no_grad) and forward+backward ==")
    samples = interleave(cases, args)
    print()
    summarize({k: v for k, v in samples.items() if "forward" in k}, args, "ours forward", "PyTorch forward")
    summarize({k: v for k, v in samples.items() if "bwd" in k}, args, "ours fwd+bwd", "PyTorch fwd+bwd")

    # XLA's FLOP estimate of each compiled program.
    for label, fn, fargs in (("forward", lambda p, x, t, c: model.apply({"params": p}, x, t, c), (params, x, t, c)),
                             ("forward+backward", jax.value_and_grad(loss_fn), (params, x, t, c, y)),
                             ("train step", train_step, (params, tx.init(params), x, t, c, y))):
        ca = jax.jit(fn).lower(*fargs).compile().cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        if ca:
            print(f"XLA cost_analysis {label:17s}: {ca.get('flops', float('nan')) / 1e9:8.1f} GFLOP  "
                  f"{ca.get('bytes accessed', float('nan')) / 1e9:6.2f} GB accessed")


if __name__ == "__main__":
    sys.exit(main())
