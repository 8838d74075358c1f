"""Pre-training the world's models from scratch (``safe-jax pretrain``), at toy sizes: each run
lowers its loss, a stopped run resumes bit for bit, every export loads in transformers/diffusers
and computes what our models compute, the data stream is a pure function of (seed, step) and
never shows a held-out picture, and bad configs are one line and exit code 2."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from launch.configs import world_clip_reward, world_unet, world_vae
from safe_jax.pretrain import data
from safe_jax.pretrain.loop import train
from tests.conftest import rel_l2

pytestmark = pytest.mark.xdist_group("pretrain")  # one worker builds the runs the tests share

STEPS = 24
COMMON = {"steps": STEPS, "data.image_size": 32, "data.batch_size": 8, "optim.warmup_steps": 2,
          "checkpoint.every": 12, "log_every": 12, "eval_examples": 8}


def _config(module, workdir, **overrides):
    config = module.get_config()
    for path, value in {**COMMON, "workdir": str(workdir), **overrides}.items():
        *parents, leaf = path.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


def vae_config(workdir, **kw):
    return _config(world_vae, workdir, **{"model.block_out_channels": (8, 16), "model.norm_num_groups": 4,
                                          "optim.lr": 3e-3, "export.dtype": "float32", **kw})


def clip_config(workdir, **kw):
    towers = {f"model.{t}.{k}": v for t in ("text", "vision")
              for k, v in dict(hidden_size=32, layers=1, heads=2, mlp_size=64).items()}
    return _config(world_clip_reward, workdir, **{
        **towers, "model.vision.patch_size": 8, "model.projection_dim": 32, "vocab_examples": 64,
        "optim.lr": 3e-3, "eval_examples": 16, **kw})


def unet_config(workdir, vae, text, **kw):
    return _config(world_unet, workdir, **{
        "vae": str(vae), "text": str(text), "model.block_out_channels": (16,), "model.attention_heads": (2,),
        "model.norm_num_groups": 8, "optim.lr": 2e-3, "optim.ema_decay": None, "sample.count": 0, **kw})


def _losses(workdir) -> np.ndarray:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return np.array([r["loss"] for r in rows])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    out = {"root": root}
    for name, config in (("vae", vae_config(root / "vae")), ("clip", clip_config(root / "clip"))):
        result = train(config)
        assert result.status == "finished" and result.step == STEPS
        out[name] = result
    result = train(unet_config(root / "unet", out["vae"].export_dir, out["clip"].export_dir))
    assert result.status == "finished"
    out["unet"] = result
    return out


@pytest.mark.parametrize("name", ["vae", "clip", "unet"])
def test_a_short_run_lowers_the_loss(runs, name):
    losses = _losses(runs[name].workdir)
    assert np.all(np.isfinite(losses))
    assert losses[-6:].mean() < 0.8 * losses[:3].mean(), losses


def test_resume_after_a_stop_is_bitwise_the_uninterrupted_run(runs):
    workdir = runs["root"] / "vae_resumed"
    stopped = train(vae_config(workdir), stop_at=12)
    assert (stopped.status, stopped.step, stopped.export_dir) == ("stopped", 12, None)
    resumed = train(vae_config(workdir))
    assert (resumed.status, resumed.step) == ("finished", STEPS)
    name = "diffusion_pytorch_model.safetensors"
    a, b = load_file(runs["vae"].export_dir / name), load_file(resumed.export_dir / name)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert np.array_equal(_losses(workdir), _losses(runs["vae"].workdir))  # one line per step, same values
    again = train(vae_config(workdir))
    assert again.already_finished


def test_vae_export_loads_in_diffusers_and_matches(runs):
    import torch
    from diffusers import AutoencoderKL

    from safe_jax.models.vae import AutoencoderKL as Ours
    from safe_jax.pretrain.unet import load_vae

    folder = runs["vae"].export_dir
    summary = json.loads((runs["vae"].workdir / "summary.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    assert config["scaling_factor"] == pytest.approx(summary["scaling_factor"]) and config["scaling_factor"] > 0
    model, params = load_vae(folder)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    mean, _ = model.apply({"params": params}, jnp.asarray(x), method=Ours.encode)
    recon = model.apply({"params": params}, mean, method=Ours.decode)
    theirs = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        t_mean = theirs.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist.mean
        t_recon = theirs.decode(t_mean).sample
    assert rel_l2(mean, t_mean.numpy().transpose(0, 2, 3, 1)) <= 1e-5
    assert rel_l2(recon, t_recon.numpy().transpose(0, 2, 3, 1)) <= 1e-5
    assert (runs["vae"].workdir / "samples").is_dir() and (runs["vae"].workdir / "checkpoints").is_dir()


def test_clip_export_loads_in_transformers_and_matches(runs):
    import torch
    from transformers import CLIPModel, CLIPTokenizer

    from safe_jax.io.clip_folder import load_clip
    from safe_jax.pretrain.clip import pixels
    from safe_jax.text.tokenizer import tokenize
    from safe_jax.train.rewards import clip_tokenizer

    folder = runs["clip"].export_dir
    captions = ["a photo of London", "Maria Okafor speaks to a rally outside the cathedral in Glasgow."]
    ours_tok, hf_tok = clip_tokenizer(folder), CLIPTokenizer.from_pretrained(str(folder))
    ids = tokenize(ours_tok, captions, 77)
    assert np.array_equal(ids, hf_tok(captions, padding="max_length", max_length=77, return_tensors="np").input_ids)
    assert len(ours_tok) < 5000  # the world's vocabulary, not CLIP's 49 408 tokens
    model, params = load_clip(folder)
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    px = np.asarray(pixels(jnp.asarray(images)))
    ours = model.apply({"params": params}, jnp.asarray(px), jnp.asarray(ids))
    theirs = CLIPModel.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = theirs(pixel_values=torch.tensor(px.transpose(0, 3, 1, 2)), input_ids=torch.tensor(ids).long())
    assert rel_l2(ours["logits_per_image"], out.logits_per_image.numpy()) <= 1e-5
    assert rel_l2(ours["text_embeds"], out.text_embeds.numpy()) <= 1e-5


def test_sd_export_loads_in_diffusers_and_matches(runs):
    import torch
    from diffusers import StableDiffusionPipeline

    from safe_jax.sampling.stable_diffusion import StableDiffusion

    folder = runs["unet"].export_dir
    pipe, params = StableDiffusion.from_pretrained(folder)
    theirs = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, torch_dtype=torch.float32)
    ids = pipe.tokenize(["Protesters gather outside the cathedral in London."])
    rng = np.random.default_rng(0)
    size = pipe.unet.config.sample_size
    latents = rng.standard_normal((1, size, size, 4)).astype(np.float32)
    context = pipe.conditioner.encode(params["text_encoder"], jnp.asarray(ids))
    ours = pipe.unet.apply({"params": params["unet"]}, jnp.asarray(latents), jnp.asarray([500]), context)
    with torch.no_grad():
        t_context = theirs.text_encoder(torch.from_numpy(ids).long())[0]
        t_out = theirs.unet(torch.from_numpy(latents.transpose(0, 3, 1, 2)), 500, t_context).sample
    assert rel_l2(context, t_context.numpy()) <= 1e-5
    assert rel_l2(ours, t_out.numpy().transpose(0, 2, 3, 1)) <= 1e-5
    assert theirs.vae.config.scaling_factor == pipe.vae.config.scaling_factor
    # The text encoder is the reward CLIP's text tower, bitwise (both fp16 on disk).
    text = load_file(folder / "text_encoder" / "model.safetensors")
    clip = load_file(runs["clip"].export_dir / "model.safetensors")
    assert all(np.array_equal(v, clip["text_model." + k]) for k, v in text.items())


def test_batches_are_a_pure_function_of_the_step_and_never_held_out():
    w = data.world(32)
    assemble = lambda examples, rng: {"images": data.images_uint8(examples),
                                      "captions": np.array([e.caption for e in examples]),
                                      "pick": rng.integers(1 << 30, size=len(examples))}
    a, b = data.StepBatches(w, 3, 4, assemble, prefetch=2), data.StepBatches(w, 3, 4, assemble, prefetch=0)
    try:
        first = [a(s) for s in (0, 1, 2, 5)]
        for s, batch in zip((5, 0, 2, 1), [b(5), b(0), b(2), b(1)]):
            expected = first[(0, 1, 2, 5).index(s)]
            assert all(np.array_equal(batch[k], expected[k]) for k in batch)
        assert not np.array_equal(first[0]["images"], first[1]["images"])
    finally:
        a.close()
        b.close()
    if w.name == "world":  # the world splits combinations: training never sees a held-out one
        assert all(data.training_example(w, 0, i).split == "train" for i in range(40))
        assert all(e.split != "train" for e in data.held_out(w, 10))
    with pytest.raises(data.SafeJaxError, match="held out"):
        data.StepBatches(w, data.HELD_OUT_SEED, 4, assemble)


def test_world_tokenizer_splits_like_clip(tmp_path):
    from safe_jax.pretrain.vocab import build_world_tokenizer, text_config_ids
    from safe_jax.text.tokenizer import tiny_tokenizer

    texts = ["Storm Babet: flood water rises near City Hall in Cardiff.", "a photo of Kenji Morita"]
    small, full = build_world_tokenizer(texts, tmp_path), tiny_tokenizer()
    assert [small.tokenize(t) for t in texts] == [full.tokenize(t) for t in texts]
    ids = text_config_ids(small)
    assert ids["eos_token_id"] == ids["vocab_size"] - 1 == ids["pad_token_id"]
    assert small.tokenize("zebra")  # unseen words still tokenise, in smaller pieces
    assert len(small) < 1000


BAD = [
    (["--config.steps=0"], "config.steps must be ≥ 1, got 0"),
    (["--config.data.seed=1000000"], "config.data.seed must be < 1000000"),
    (["--config.optim.lr=-1"], "config.optim.lr must be > 0"),
    (["--config.model.norm_num_groups=5"], "norm_num_groups (5) must divide"),
    (["--config.data.image_size=62"], "multiple of the VAE's downscale 4"),
    (["--config.export.dtype=int8"], "config.export.dtype must be one of"),
    (["--config.optim.schedul=cosine"], "has no field 'schedul'"),
    (["--stop-at=0"], "--stop-at must be in [1, config.steps"),
    (["--config.optim.ema_decay=1.0"], "config.optim.ema_decay must be < 1"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[a[0] for a, _ in BAD])
def test_bad_vae_config_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    from launch import pretrain

    code = pretrain.main(["--config", "launch/configs/world_vae.py", f"--config.workdir={tmp_path / 'w'}", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("config,args,message", [
    ("world_clip_reward.py", ["--config.model.text.heads=5"], "hidden_size (128) must be a multiple of"),
    ("world_clip_judge.py", ["--config.model.vision.patch_size=7"], "patch_size (7) must divide"),
    ("world_unet.py", ["--config.vae=/nonexistent"], "config.vae: /nonexistent is not an AutoencoderKL folder"),
    ("world_unet.py", ["--config.model.attention_heads=(2,4)"], "needs one entry per block (3)"),
    ("world_unet.py", ["--config.loss.cond_dropout=1.5"], "config.loss.cond_dropout must be < 1"),
])
def test_bad_task_config_is_one_line_and_exit_2(tmp_path, capsys, config, args, message):
    from launch import pretrain

    code = pretrain.main(["--config", f"launch/configs/{config}", f"--config.workdir={tmp_path / 'w'}", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_safe_jax_pretrain_is_a_command(capsys):
    from launch import cli

    assert cli.main(["pretrain", "--config", "launch/configs/world_unet.py:quick", "--config.steps=0"]) == 2
    assert capsys.readouterr().err.strip() == "safe-jax pretrain: error: config.steps must be ≥ 1, got 0"
