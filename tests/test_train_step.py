"""The SAFE train step: sharded equals single-device, compiles once, ReFL optimises its reward, NaN guard."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_l2

from safe_jax import sharding
from safe_jax.sampling.stable_diffusion import StableDiffusion
from safe_jax.train import lora, losses, rewards
from safe_jax.train import step as ts


def _setup(cfg: ts.StepConfig, lr=1e-3, batch_size=2, seed=0, preset="tiny"):
    pipe, params = StableDiffusion.from_pretrained(preset)
    tx = ts.make_optimizer(lr, total_steps=100, schedule="constant", weight_decay=0.0)
    trainable = lora.init_lora(params["unet"], jax.random.key(seed), rank=4) if cfg.mode == "lora" else params["unet"]
    frozen = {"text_encoder": pipe.conditioner.text_params(params), "vae": params["vae"],
              "unet": params["unet"] if cfg.mode == "lora" else {}, "reward": {}}
    captions = ["Boris Johnson on Tower Bridge", "firefighters at a flooded street"] * (batch_size // 2)
    tw = pipe.token_weights(captions, [["Boris Johnson"], ["firefighters"]] * (batch_size // 2))
    batch = {"input_ids": jnp.asarray(tw.ids), "token_weights": jnp.asarray(tw.weights),
             "images": jax.random.uniform(jax.random.key(1), (batch_size, 64, 64, 3), minval=-1, maxval=1)}
    if pipe.is_xl:  # each image's (original size, crop top-left, target size)
        batch["time_ids"] = jnp.asarray([[96, 80 + i, i, 0, 64, 64] for i in range(batch_size)], jnp.float32)
    return pipe, tx, ts.init_state(trainable, tx, seed=seed), frozen, batch


def _step_fn(pipe, cfg, tx, reward=None):
    model = ts.DiffusionModel.from_modules(pipe.unet, pipe.vae, pipe.schedule)
    return ts.make_train_step(model, pipe.conditioner, cfg, tx, reward)


def test_refl_raises_the_reward():
    """With the brightness reward, a short ReFL run on `tiny` brightens the images well beyond noise."""
    cfg = ts.StepConfig(mode="full", loss="refl", refl_steps=4, refl_step_range=(1, 3), ema_decay=None)
    pipe, tx, state, frozen, batch = _setup(cfg, lr=3e-4)
    brightness = rewards.make_reward("brightness")
    context = pipe.conditioner(frozen["text_encoder"], batch["input_ids"], batch["token_weights"])

    @jax.jit
    def mean_reward(unet_params, key):  # the reward of the ReFL prediction, for one noise/step draw
        unet = lambda p, x, t, c: pipe.unet.apply({"params": p}, x, t, c)
        decode = lambda z: pipe.vae.apply({"params": frozen["vae"]}, z, method=type(pipe.vae).decode)
        _, m = losses.refl_loss(unet, unet_params, decode, lambda im, b: brightness({}, im, b), context, {}, key,
                                pipe.schedule, (2, 32, 32, 4), 0.18215, 4, (1, 3))
        return m["reward"]

    keys = [jax.random.key(100 + i) for i in range(6)]
    before = np.array([float(mean_reward(state.params, k)) for k in keys])
    step = ts.compile_train_step(_step_fn(pipe, cfg, tx, brightness), state, frozen, batch,
                                 sharding.make_mesh())
    for _ in range(12):
        state, metrics = step(state, frozen, batch)
    after = np.array([float(mean_reward(state.params, k)) for k in keys])
    # Seed-to-seed spread of the untrained model's reward, against the gain on the same draws.
    assert after.mean() - before.mean() > 5 * before.std() + 0.01, (before, after)


def test_refl_gradient_flows_only_through_the_last_step():
    pipe, params = StableDiffusion.from_pretrained("tiny")
    unet = lambda p, x, t, c: pipe.unet.apply({"params": p}, x, t, c)
    decode = lambda z: pipe.vae.apply({"params": params["vae"]}, z, method=type(pipe.vae).decode)
    reward = lambda images, b: jnp.mean(images, axis=(1, 2, 3))
    context = pipe.encode_prompt(params, ["a", "b"])
    kw = dict(schedule=pipe.schedule, latent_shape=(2, 32, 32, 4), scaling_factor=0.18215, num_steps=4,
              step_range=(2, 2))
    key = jax.random.key(3)

    def full(p):
        return losses.refl_loss(unet, p, decode, reward, context, {}, key, **kw)[0]

    # The same loss, but the rollout runs on a *different* parameter set: if gradient leaked through
    # the rollout, the two gradients would differ.
    other = jax.tree.map(lambda x: x + 0.0, params["unet"])

    def last_step_only(p):
        def u(q, x, t, c):  # rollout calls get `other` (a constant), the final call gets p
            return jax.lax.cond(jnp.all(t == losses_timestep(pipe, 2)), lambda: unet(p, x, t, c),
                                lambda: unet(jax.lax.stop_gradient(other), x, t, c))
        return losses.refl_loss(u, p, decode, reward, context, {}, key, **kw)[0]

    g_full = jax.jit(jax.grad(full))(params["unet"])
    g_last = jax.jit(jax.grad(last_step_only))(params["unet"])
    flat = lambda g: np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])
    assert np.linalg.norm(flat(g_full)) > 0
    np.testing.assert_allclose(flat(g_full), flat(g_last), rtol=1e-5, atol=1e-9)


def losses_timestep(pipe, j):
    import dataclasses

    from safe_jax.sampling import schedulers
    sampler = schedulers.make_sampler("ddim", dataclasses.replace(pipe.schedule, timestep_spacing="leading"), 4)
    return jnp.asarray(sampler.timesteps[j]).astype(jnp.int32)


def test_nan_guard_skips_the_update():
    cfg = ts.StepConfig(mode="lora", loss="denoising")
    pipe, tx, state, frozen, batch = _setup(cfg)
    batch = dict(batch, images=batch["images"].at[0, 0, 0, 0].set(jnp.nan))
    step = jax.jit(_step_fn(pipe, cfg, tx))
    before = jax.tree.map(np.asarray, state.params)
    state, metrics = step(state, frozen, batch)
    assert not bool(metrics["finite"])
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params)))
    assert int(state.step) == 1


SHARDED = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, "tests")
    from test_train_step import _setup, _step_fn
    from safe_jax import sharding
    from safe_jax.train import step as ts
    from safe_jax.train import rewards
    preset, loss = sys.argv[1:3]
    cfg = ts.StepConfig(mode="full", loss=loss, cond_dropout=0.0, ema_decay=None, refl_steps=4, refl_step_range=(1, 3))
    reward = rewards.make_reward("brightness") if loss != "denoising" else None
    results = {}
    for name, mesh in (("one", sharding.make_mesh(devices=jax.devices()[:1])), ("2x4", sharding.make_mesh(data=2, fsdp=4))):
        pipe, tx, state, frozen, batch = _setup(cfg, batch_size=8, preset=preset)
        step_fn = _step_fn(pipe, cfg, tx, reward)
        compiled = ts.compile_train_step(step_fn, state, frozen, batch, mesh)
        state = jax.device_put(state, sharding.shardings_for(state, mesh))
        new, metrics = compiled(state, frozen, batch)
        if name == "2x4":
            big = [x for x in jax.tree.leaves(new.params) if x.size >= sharding.MIN_SHARD_SIZE]
            assert big and all(x.addressable_shards[0].data.size * 4 == x.size for x in big)
            mu = [x for x in jax.tree.leaves(new.opt_state) if x.size >= sharding.MIN_SHARD_SIZE]
            assert mu and all(x.addressable_shards[0].data.size * 4 == x.size for x in mu)
            try:
                compiled(new, frozen, dict(batch, input_ids=batch["input_ids"][:4]))
                raise AssertionError("a new batch shape must not recompile silently")
            except (TypeError, ValueError):
                pass
        results[name] = (jax.tree.map(np.asarray, new.params), float(metrics["loss"]))
    a, b = results["one"][0], results["2x4"][0]
    flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
    rel = np.linalg.norm(flat(a) - flat(b)) / np.linalg.norm(flat(a))
    print("REL", rel, results["one"][1], results["2x4"][1])
    assert rel <= 1e-6, rel
    assert abs(results["one"][1] - results["2x4"][1]) <= 1e-5 * abs(results["one"][1])
""")


# ReFL (a rollout, the VAE decode and the reward inside the step) on SD; SDXL's added conditions
# with the denoising loss (its loss-side code is SD's).
@pytest.mark.parametrize("preset,loss", [("tiny", "refl"), ("tiny-xl", "denoising")])
def test_sharded_step_equals_single_device(preset, loss):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", SHARDED, preset, loss], env=env, capture_output=True, text=True, timeout=900,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "REL" in res.stdout


@pytest.mark.parametrize("weight", [0.8, 1.21])
def test_training_conditions_as_inference_does(weight, tmp_path):
    """The context the step trains on, from a training config's subjects section and the input
    pipeline's token weights, equals ``pipe.encode_prompt`` on the same captions and subjects; for
    w < 1 that includes Compel's down-weighting blend."""
    from launch.configs import tiny_safe
    from safe_jax.data import InputConfig, data_source, make_iterator
    from safe_jax.data.source import as_text, as_texts

    config = tiny_safe.get_config()
    config.subjects.weight = weight
    pipe, params = StableDiffusion.from_pretrained("tiny")
    step_cfg = ts.StepConfig.from_config(config)
    assert step_cfg.subjects.training_downweighted == (8 if weight < 1 else 0)
    data = make_iterator(InputConfig(data_dir=str(tmp_path / "tfds"), resolution=16, batch_size=4, worker_count=0,
                                     shuffle=False, subject_weight=step_cfg.subjects.weight), pipe.tokenizer)
    batch = next(data)
    ours = jax.jit(lambda p, b: ts.step_conditioning(pipe.conditioner, step_cfg, p, b))(
        params["text_encoder"], {k: batch[k] for k in ("input_ids", "token_weights")})
    source = data_source("anchor/sample", "train", str(tmp_path / "tfds"))
    by_id = {source[i]["image_id"]: source[i] for i in range(len(source))}
    records = [by_id[bytes(image_id)] for image_id in batch["image_id"]]
    ref = pipe.encode_prompt(params, [as_text(r["caption"]) for r in records],
                             subjects=[as_texts(r["subjects"]) for r in records], subject_weight=weight)
    assert (np.asarray(batch["token_weights"]) != 1).any()  # the captions have weighted subjects
    assert rel_l2(ours, ref) <= 1e-6


def test_sdxl_training_conditions_as_inference_does(tmp_path):
    """SDXL: the step's conditioning from the input pipeline (subject weights, micro-conditioning
    time ids) equals ``pipe.encode_prompt`` plus those time ids; the dropped condition is the
    empty prompt's text parts with the image's own time ids kept."""
    from launch.configs import tiny_safe
    from safe_jax.data import InputConfig, data_source, make_iterator
    from safe_jax.data.source import as_text, as_texts
    from safe_jax.text.conditioner import with_time_ids

    config = tiny_safe.get_config()
    pipe, params = StableDiffusion.from_pretrained("tiny-xl")
    step_cfg = ts.StepConfig.from_config(config)
    data = make_iterator(InputConfig(data_dir=str(tmp_path / "tfds"), resolution=16, batch_size=4, worker_count=0,
                                     shuffle=False, subject_weight=step_cfg.subjects.weight, micro_conditioning=True),
                         pipe.tokenizer)
    batch = next(data)
    assert batch["time_ids"].shape == (4, 6) and (np.asarray(batch["time_ids"])[:, 4:] == 16).all()
    text_params = pipe.conditioner.text_params(params)
    keys = ("input_ids", "token_weights", "time_ids")
    ours = jax.jit(lambda p, b: ts.step_conditioning(pipe.conditioner, step_cfg, p, b))(
        text_params, {k: batch[k] for k in keys})
    source = data_source("anchor/sample", "train", str(tmp_path / "tfds"))
    by_id = {source[i]["image_id"]: source[i] for i in range(len(source))}
    records = [by_id[bytes(image_id)] for image_id in batch["image_id"]]
    ref = with_time_ids(pipe.encode_prompt(params, [as_text(r["caption"]) for r in records],
                                           subjects=[as_texts(r["subjects"]) for r in records]), batch["time_ids"])
    assert set(ours) == {"encoder_hidden_states", "text_embeds", "time_ids"}
    for key in ours:
        assert rel_l2(ours[key], ref[key]) <= 1e-6, key

    empty = pipe.conditioner.empty(text_params)
    dropped = losses.drop_conditioning(ours, empty, 1.0, jax.random.key(0))
    np.testing.assert_array_equal(dropped["time_ids"], ours["time_ids"])
    for key in ("encoder_hidden_states", "text_embeds"):
        np.testing.assert_array_equal(dropped[key], np.broadcast_to(empty[key], ours[key].shape))
