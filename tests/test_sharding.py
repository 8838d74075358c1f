"""Meshes and FSDP parameter sharding on 8 virtual CPU devices (in a subprocess: this process has 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from jax.sharding import PartitionSpec as P

from safe_jax import SafeJaxError
from safe_jax import sharding as shd

# Runs with XLA_FLAGS=--xla_force_host_platform_device_count=8 and prints one JSON line of facts.
SCRIPT = textwrap.dedent(r'''
    import json, math
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from safe_jax import SafeJaxError, sharding as shd
    from safe_jax.train import lora
    from safe_jax.sampling.stable_diffusion import StableDiffusion

    out = {"devices": jax.device_count()}
    mesh = shd.make_mesh(data=2, fsdp=4)
    out["mesh"] = dict(mesh.shape)
    out["mesh_fill"] = dict(shd.make_mesh(fsdp=2, tensor=2).shape)
    errors = {}
    for name, kw in {"two_fills": dict(data=-1, fsdp=-1), "not_divisible": dict(data=3, fsdp=-1),
                     "too_few": dict(data=2, fsdp=2), "zero": dict(data=0, fsdp=8)}.items():
        try:
            shd.make_mesh(**kw)
            errors[name] = None
        except SafeJaxError as e:
            errors[name] = str(e)
    out["mesh_errors"] = errors

    def check_quarters(tree, shardings, min_size=shd.MIN_SHARD_SIZE):
        """Every large leaf is split 4 ways over fsdp (each shard a quarter); small ones replicated."""
        placed = jax.device_put(tree, shardings)
        bad, n_large, n_small = [], 0, 0
        for (path, leaf), arr in zip(jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree.leaves(placed)):
            name, shape = shd.path_str(path), np.shape(leaf)
            local = arr.addressable_shards[0].data.shape
            if math.prod(shape) >= min_size and "/bias" not in name and "/scale" not in name:
                n_large += 1
                spec = arr.sharding.spec
                if "fsdp" not in tuple(spec) or 4 * math.prod(local) != math.prod(shape):
                    bad.append((name, shape, str(spec), local))
            else:
                n_small += 1
                if tuple(local) != tuple(shape):
                    bad.append((name, shape, str(arr.sharding.spec), local))
        return {"large": n_large, "small": n_small, "bad": bad}, placed

    pipe, params = StableDiffusion.from_pretrained("tiny")
    unet = params["unet"]
    p_sh = shd.shardings_for(unet, mesh)
    out["unet"], unet_sharded = check_quarters(unet, p_sh)
    specs = shd.param_partition_specs(unet, mesh)
    out["spec_conv"] = str(specs["mid_block"]["resnets_0"]["conv1"]["kernel"])
    out["spec_bias"] = str(specs["mid_block"]["resnets_0"]["conv1"]["bias"])
    out["spec_ff"] = str(specs["mid_block"]["attentions_0"]["transformer_blocks_0"]["ff"]["net_2"]["kernel"])
    tp = shd.make_mesh(data=2, fsdp=2, tensor=2)
    out["spec_conv_tp"] = str(shd.param_partition_specs(unet, tp)["mid_block"]["resnets_0"]["conv1"]["kernel"])
    abstract = jax.eval_shape(lambda: unet)
    out["abstract_same"] = shd.param_partition_specs(abstract, mesh) == specs

    # The whole of every text/VAE tree too: nothing fails, shards are quarters.
    out["vae"], _ = check_quarters(params["vae"], shd.shardings_for(params["vae"], mesh))
    out["text"], _ = check_quarters(params["text_encoder"], shd.shardings_for(params["text_encoder"], mesh))

    # AdamW state: mu/nu shard like the params; the step count is replicated.
    tx = optax.adamw(1e-3, weight_decay=1e-2)
    opt = tx.init(unet)
    o_sh = shd.shardings_for(opt, mesh)
    out["opt"], _ = check_quarters(opt, o_sh)
    out["opt_mu_spec_same"] = o_sh[0].mu["mid_block"]["resnets_0"]["conv1"]["kernel"].spec == \
        p_sh["mid_block"]["resnets_0"]["conv1"]["kernel"].spec
    out["opt_count_spec"] = str(o_sh[0].count.spec)
    # A sharded AdamW step equals the unsharded one (on the mid block: compiling all ~400 leaves
    # for 8 virtual devices takes long on a small CPU, and adds nothing).
    sub = {"mid_block": unet["mid_block"]}
    sub_opt = tx.init(sub)
    sp_sh, so_sh = shd.shardings_for(sub, mesh), shd.shardings_for(sub_opt, mesh)
    grads = jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(x.size).standard_normal(x.shape, np.float32)), sub)

    def step(p, o, g):
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o

    ref_p, ref_o = jax.jit(step)(sub, sub_opt, grads)
    new_p, new_o = jax.jit(step, in_shardings=(sp_sh, so_sh, sp_sh), out_shardings=(sp_sh, so_sh))(
        jax.device_put(sub, sp_sh), jax.device_put(sub_opt, so_sh), jax.device_put(grads, sp_sh))
    out["opt_step_maxdiff"] = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                                  zip(jax.tree.leaves((ref_p, ref_o)), jax.tree.leaves((new_p, new_o))))
    out["opt_step_out_spec"] = str(new_o[0].nu["mid_block"]["resnets_0"]["conv1"]["kernel"].sharding.spec)

    # UNet forward, batch 8 over (data, fsdp), parameters FSDP-sharded: same numbers as 1 device.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 8, 8, 4), np.float32)
    t = np.array([1, 50, 100, 200, 400, 600, 800, 999], np.float32)
    c = rng.standard_normal((8, 5, 32), np.float32)
    fwd = lambda p, x, t, c: pipe.unet.apply({"params": p}, x, t, c)
    ref = np.asarray(jax.jit(fwd)(unet, x, t, c))
    batch = shd.batch_sharding(mesh)
    out["batch_spec"] = str(batch.spec)
    xs, ts, cs = shd.shard_batch((x, t, c), mesh)
    out["batch_local"] = list(xs.addressable_shards[0].data.shape)
    got = jax.jit(fwd, in_shardings=(p_sh, batch, batch, batch), out_shardings=batch)(unet_sharded, xs, ts, cs)
    out["fwd_out_spec"] = str(got.sharding.spec)
    rel = lambda a, b: float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))
    out["fwd_rel"] = rel(got, ref)
    # XLA:CPU picks different conv kernels for batch 1 and batch 8 (~1e-6 apart); sharding itself
    # adds nothing: one device at the per-device batch gives the same bits.
    ref1 = np.concatenate([np.asarray(jax.jit(fwd)(unet, x[i:i + 1], t[i:i + 1], c[i:i + 1])) for i in range(8)])
    out["fwd_rel_local_batch"] = rel(got, ref1)

    def constrained(x):
        return shd.with_logical_constraint(x * 2, ("batch", None, None, None), mesh)
    out["constraint_spec"] = str(jax.jit(constrained)(xs).sharding.spec)
    try:
        shd.shard_batch(np.zeros((6, 3)), mesh)
        out["batch_error"] = None
    except SafeJaxError as e:
        out["batch_error"] = str(e)

    # LoRA trees: small factors are replicated; with min_size=0 they are sharded too.
    lp = lora.init_lora(unet, jax.random.key(0), rank=4)
    out["lora"], _ = check_quarters(lp, shd.shardings_for(lp, mesh))
    out["lora_all"], _ = check_quarters(lp, shd.shardings_for(lp, mesh, min_size=0), min_size=0)

    # Explicit rules: logical names and PartitionSpecs come first; misfits are errors.
    rules = ((r"conv1/kernel$", (None, None, "mlp", "embed")), (r"conv2/kernel$", P(None, None, None, "data")),
             *shd.PARAM_RULES)
    s = shd.param_partition_specs(unet, mesh, rules)["mid_block"]["resnets_0"]
    out["explicit"] = [str(s["conv1"]["kernel"]), str(s["conv2"]["kernel"])]
    try:
        shd.param_partition_specs(unet, mesh, ((r"conv_in/kernel$", P("fsdp")),))  # 3 rows over 4 devices
        out["explicit_error"] = None
    except SafeJaxError as e:
        out["explicit_error"] = str(e)
    print("RESULT " + json.dumps(out))
''')


@pytest.fixture(scope="module")
def facts():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_mesh_shapes_and_errors(facts):
    assert facts["devices"] == 8
    assert facts["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert facts["mesh_fill"] == {"data": 2, "fsdp": 2, "tensor": 2}
    errors = facts["mesh_errors"]
    assert "at most one" in errors["two_fills"]
    assert "does not divide the 8" in errors["not_divisible"]
    assert "needs 4 devices but 8" in errors["too_few"]
    assert "positive" in errors["zero"]


def test_unet_params_sharded_in_quarters(facts):
    for tree in ("unet", "vae", "text", "opt"):
        assert facts[tree]["bad"] == [], tree
    assert facts["unet"]["large"] > 0 and facts["unet"]["small"] > 0
    assert facts["opt"]["large"] == 2 * facts["unet"]["large"]  # mu and nu
    assert facts["spec_conv"] == str(P(None, None, "fsdp"))      # [3, 3, 64, 64]: input features
    assert facts["spec_ff"] == str(P("fsdp"))                    # [256, 64]: the larger dim
    assert facts["spec_bias"] == str(P())
    assert facts["spec_conv_tp"] == str(P(None, None, "fsdp", "tensor"))
    assert facts["abstract_same"]


def test_optimizer_state_follows_params(facts):
    assert facts["opt_mu_spec_same"]
    assert facts["opt_count_spec"] == str(P())
    assert facts["opt_step_maxdiff"] <= 1e-6
    assert facts["opt_step_out_spec"] == str(P(None, None, "fsdp"))


def test_sharded_unet_forward_matches_one_device(facts):
    assert facts["batch_spec"] == str(P(("data", "fsdp")))
    assert facts["batch_local"] == [1, 8, 8, 4]
    assert facts["fwd_out_spec"] == str(P(("data", "fsdp")))
    assert facts["fwd_rel_local_batch"] <= 1e-6
    assert facts["fwd_rel"] <= 5e-6  # measured 9e-7: batch-1 vs batch-8 CPU kernels, not sharding
    assert facts["constraint_spec"] == str(P(("data", "fsdp")))
    assert "not divisible by the 8 batch shards" in facts["batch_error"]


def test_lora_tree_and_explicit_rules(facts):
    assert facts["lora"]["large"] == 0 and facts["lora"]["bad"] == []
    assert facts["lora_all"]["bad"] == []
    assert facts["explicit"] == [str(P(None, None, "tensor", "fsdp")), str(P(None, None, None, "data"))]
    assert "not divisible" in facts["explicit_error"]


def test_single_device_mesh_replicates_everything():
    import jax

    mesh = shd.make_mesh()
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
    tree = {"a": {"kernel": jax.ShapeDtypeStruct((512, 512), "float32")}, "count": 0}
    specs = shd.param_partition_specs(tree, mesh)
    assert specs == {"a": {"kernel": P()}, "count": P()}
    with pytest.raises(SafeJaxError, match="needs 2 devices"):
        shd.make_mesh(data=2, devices=jax.devices()[:1])
    with pytest.raises(SafeJaxError, match="no sharding rule"):
        shd.logical_to_spec(("nonsense",))


BARRIER_WORKER = textwrap.dedent('''
    import sys, time
    import jax, numpy as np
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    port, pid = sys.argv[1], int(sys.argv[2])
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid, initialization_timeout=120)
    from safe_jax import sharding
    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices())
    x = jax.make_array_from_process_local_data(jax.NamedSharding(mesh, jax.P("data")), np.full(2, pid + 1.0))
    total = jax.jit(lambda v: v.sum()).lower(x).compile()
    if pid == 1:
        time.sleep(40)  # a slow compile: past the 30 s that a device group's first collective waits (gloo)
    sharding.wait_for_all_processes("slow_start")
    print("sum", float(total(x)))  # the group's first collective
    jax.distributed.shutdown()
''')


def test_processes_meet_at_the_barrier_before_a_first_collective(tmp_path):
    """A process 40 s late to the first step: its collectives still start together, because
    every process first waits at the runtime's barrier (without it, process 0 fails after 30 s:
    "Gloo context initialization failed: DEADLINE_EXCEEDED")."""
    import socket
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(BARRIER_WORKER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_FLAGS")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, str(script), str(port), str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    assert all("sum 6.0" in log for log in logs), logs  # 2 × 1.0 + 2 × 2.0 over both processes
