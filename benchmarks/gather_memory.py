"""Host memory of gathering a trained UNet for an export: to every process (``host_copy``) against
to process 0 only (``host_copy_to_process_0``, what training now uses), with two processes.

The UNet is the 142M-parameter SD 1.5 layout at block_out_channels (128, 256, 512, 512)
(``train_step_vs_torch.py``'s ``mid``), its parameters sharded FSDP-style over 2 processes × 4 CPU
devices (jax.distributed with gloo on loopback), as a multi-host run holds them. Each process
reports its peak resident memory (ru_maxrss) before and after each gather, each gather measured
in a fresh pair of processes so one does not hide the other.

    python benchmarks/gather_memory.py
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

WORKER = r"""
import json, resource, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import jax.numpy as jnp
import numpy as np
from safe_jax import sharding
from safe_jax.models.unet import UNet2DConditionModel, UNetConfig

cfg = UNetConfig.from_diffusers(dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                                     cross_attention_dim=768, attention_head_dim=8, sample_size=32,
                                     down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                                     up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3))
shapes = jax.eval_shape(UNet2DConditionModel(cfg).init, jax.random.key(0), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)),
                        jnp.zeros((1, 1, 768)))["params"]
mesh = sharding.make_mesh(data=1, fsdp=8)
shardings = sharding.shardings_for(shapes, mesh)
params = jax.jit(lambda: jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes), out_shardings=shardings)()
jax.block_until_ready(params)
n = sum(x.size for x in jax.tree.leaves(params))
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
before = rss()
gather = sharding.host_copy if sys.argv[3] == "all" else sharding.host_copy_to_process_0
tree = gather(params)
held = sum(x.nbytes for x in jax.tree.leaves(tree)) / 2**20 if tree is not None else 0.0
print(json.dumps({"process": jax.process_index(), "params": n, "before_mib": before, "peak_mib": rss(),
                  "held_mib": held}), flush=True)
jax.distributed.shutdown()
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(mode: str) -> list[dict]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    address = f"127.0.0.1:{_port()}"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, address, str(i), mode], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    rows = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        if proc.returncode:
            raise SystemExit(err[-3000:])
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return sorted(rows, key=lambda r: r["process"])


def main() -> int:
    results = {mode: run(mode) for mode in ("all", "process_0")}
    n = results["all"][0]["params"]
    print(f"UNet {n / 1e6:.0f}M parameters (fp32 {n * 4 / 2**20:.0f} MiB), 2 processes x 4 CPU devices, FSDP over 8")
    print("| gather | process | peak RSS before | peak RSS after | growth | tree held |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mode, rows in results.items():
        for r in rows:
            print(f"| {mode} | {r['process']} | {r['before_mib']:.0f} MiB | {r['peak_mib']:.0f} MiB | "
                  f"{r['peak_mib'] - r['before_mib']:.0f} MiB | {r['held_mib']:.0f} MiB |")
    growth = lambda mode, p: results[mode][p]["peak_mib"] - results[mode][p]["before_mib"]
    print(f"process 1's growth: {growth('all', 1):.0f} MiB with host_copy, {growth('process_0', 1):.0f} MiB to "
          f"process 0 only ({growth('all', 1) / max(growth('process_0', 1), 1):.1f}x less)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
