"""Stable Diffusion XL against diffusers and transformers: UNet with added conditions, both text
encoders, the whole pipeline, Compel's SDXL weighting, the export round trip, the real size."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rel_l2
from safetensors.numpy import load_file

from safe_jax.errors import SafeJaxError
from safe_jax.sampling.stable_diffusion import StableDiffusion
from safe_jax.text import conditioning as cond

PROMPTS = ["London's mayor Boris Johnson gives a big thumbs up on Tower Bridge.", "a photo of a cat"]


@pytest.fixture(scope="module")
def loaded(tiny_xl_folder):
    folder, torch_pipe = tiny_xl_folder
    pipe, params = StableDiffusion.from_pretrained(folder)
    return pipe, params, torch_pipe


def _latents(pipe: StableDiffusion, batch: int, seed: int = 0) -> np.ndarray:
    s = pipe.unet.config.sample_size
    return np.random.RandomState(seed).randn(batch, 4, s, s).astype(np.float32)


def test_loads_as_xl(loaded):
    pipe, params, _ = loaded
    assert pipe.is_xl and pipe.force_zeros_for_empty_prompt and pipe.default_sampler == "euler"
    assert set(params) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert pipe.vae.config.scaling_factor == 0.13025


def test_unet_with_added_conditions_matches_diffusers(loaded):
    pipe, params, torch_pipe = loaded
    rng = np.random.RandomState(0)
    u = pipe.unet.config
    x = rng.randn(2, 4, 32, 24).astype(np.float32)  # NCHW, not square
    t = np.array([999, 17], np.int64)
    ctx = rng.randn(2, 77, u.cross_attention_dim).astype(np.float32)
    pooled = rng.randn(2, u.pooled_dim).astype(np.float32)
    time_ids = np.array([[1024, 768, 0, 12, 256, 192], [64, 64, 3, 0, 64, 64]], np.float32)
    with torch.no_grad():
        ref = torch_pipe.unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx),
                              added_cond_kwargs={"text_embeds": torch.from_numpy(pooled),
                                                 "time_ids": torch.from_numpy(time_ids)}).sample.numpy()
    cond_tree = {"encoder_hidden_states": ctx, "text_embeds": pooled, "time_ids": time_ids}
    ours = pipe.unet.apply({"params": params["unet"]}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), cond_tree)
    assert rel_l2(np.asarray(ours).transpose(0, 3, 1, 2), ref) <= 1e-5
    # the added conditions matter: other time ids give another output
    moved = pipe.unet.apply({"params": params["unet"]}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t),
                            dict(cond_tree, time_ids=time_ids[::-1].copy()))
    assert rel_l2(moved, ours) > 1e-3
    with pytest.raises(SafeJaxError, match="text_embeds and time_ids"):
        pipe.unet.apply({"params": params["unet"]}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), ctx)


def test_text_encoders_match_transformers(loaded):
    pipe, params, torch_pipe = loaded
    ids = pipe.tokenize(PROMPTS)
    ids_2 = np.array(pipe.conditioner.second_ids(jnp.asarray(ids)))
    np.testing.assert_array_equal(ids_2, torch_pipe.tokenizer_2(PROMPTS, padding="max_length", max_length=77,
                                                                truncation=True, return_tensors="np")["input_ids"])
    with torch.no_grad():
        ref_1 = torch_pipe.text_encoder(torch.from_numpy(ids).long(), output_hidden_states=True)
        ref_2 = torch_pipe.text_encoder_2(torch.from_numpy(ids_2).long(), output_hidden_states=True)
    ours_1 = pipe.text_encoder.apply({"params": params["text_encoder"]}, jnp.asarray(ids))
    ours_2 = pipe.text_encoder_2.apply({"params": params["text_encoder_2"]}, jnp.asarray(ids_2))
    assert rel_l2(ours_1["hidden_states"][-2], ref_1.hidden_states[-2].numpy()) <= 1e-5
    assert rel_l2(ours_2["hidden_states"][-2], ref_2.hidden_states[-2].numpy()) <= 1e-5
    assert rel_l2(ours_2["text_embeds"], ref_2.text_embeds.numpy()) <= 1e-5
    # and the pipeline's conditioning is diffusers' encode_prompt
    with torch.no_grad():
        embeds, _, pooled, _ = torch_pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    ours = pipe.encode_prompt(params, PROMPTS)
    assert rel_l2(ours["encoder_hidden_states"], embeds.numpy()) <= 1e-5
    assert rel_l2(ours["text_embeds"], pooled.numpy()) <= 1e-5


def _diffusers_images(torch_pipe, latents, steps, guidance, scheduler, negative=None) -> np.ndarray:
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}[scheduler]
    torch_pipe.scheduler = cls.from_config(torch_pipe.scheduler.config)
    with torch.no_grad():
        return torch_pipe(PROMPTS, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                          latents=torch.from_numpy(latents), output_type="np").images


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_generate_matches_diffusers(loaded, scheduler):
    pipe, params, torch_pipe = loaded
    latents = _latents(pipe, len(PROMPTS), seed=1)
    ours = pipe.generate(params, PROMPTS, num_steps=8, guidance_scale=5.0, scheduler=scheduler, latents=latents)
    ref = _diffusers_images(torch_pipe, latents, 8, 5.0, scheduler)
    assert ours.shape == ref.shape and np.abs(ours / 255.0 - ref).mean() <= 1 / 255
    assert ours.std() > 5 and np.abs(ours[0].astype(int) - ours[1]).mean() > 1


def test_generate_with_negative_prompt_matches_diffusers(loaded):
    """An explicit negative prompt is encoded (not zeroed), as diffusers does."""
    pipe, params, torch_pipe = loaded
    latents = _latents(pipe, len(PROMPTS), seed=2)
    negative = ["blurry", ""]
    ours = pipe.generate(params, PROMPTS, negative, num_steps=6, guidance_scale=5.0, scheduler="euler",
                         latents=latents)
    ref = _diffusers_images(torch_pipe, latents, 6, 5.0, "euler", negative=negative)
    assert np.abs(ours / 255.0 - ref).mean() <= 1 / 255
    zeroed = pipe.generate(params, PROMPTS, num_steps=6, guidance_scale=5.0, scheduler="euler", latents=latents)
    assert np.abs(zeroed.astype(int) - ours).mean() > 0.5


# ------------------------------------------------------------------------------ Compel's SDXL mode
@pytest.fixture(scope="module")
def compel_xl(loaded):
    compel = pytest.importorskip("compel")
    _, _, p = loaded
    c = compel.Compel(tokenizer=[p.tokenizer, p.tokenizer_2], text_encoder=[p.text_encoder, p.text_encoder_2],
                      returned_embeddings_type=compel.ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
                      requires_pooled=[False, True])

    def run(prompt):
        with torch.no_grad():
            embeds, pooled = c(prompt)
        return embeds[0].numpy(), pooled[0].numpy()
    return run


COMPEL_TABLE = [
    "(Boris Johnson)++ on Tower Bridge",
    "a (red)1.3 bus",
    "(crowd)0.5 at a rally",
    "London's mayor (Boris Johnson)++ gives a (big)0.8 thumbs up on (Tower Bridge)1.4641.",
    "no weights at all",
]


def test_compel_syntax_matches_compel_sdxl(loaded, compel_xl):
    pipe, params, _ = loaded
    ours = pipe.encode_prompt(params, COMPEL_TABLE, prompt_syntax="compel")
    for row, prompt in enumerate(COMPEL_TABLE):
        embeds, pooled = compel_xl(prompt)
        assert rel_l2(ours["encoder_hidden_states"][row], embeds) <= 1e-5, prompt
        assert rel_l2(ours["text_embeds"][row], pooled) <= 1e-5, prompt


@pytest.mark.parametrize("weight,op", [(1.1**2, "++"), (0.5, "0.5")])
def test_subject_weighting_matches_compel_sdxl(loaded, compel_xl, weight, op):
    pipe, params, _ = loaded
    captions = [PROMPTS[0], "Protesters and police face off as protesters march to Parliament"]
    subjects = [["Boris Johnson", "Tower Bridge"], ["protesters", "police"]]
    ours = pipe.encode_prompt(params, captions, subjects=subjects, subject_weight=weight)
    plain = pipe.encode_prompt(params, captions)
    _, _, torch_pipe = loaded
    with torch.no_grad():
        _, _, diffusers_pooled, _ = torch_pipe.encode_prompt(captions, do_classifier_free_guidance=False)
    for row, (caption, phrases) in enumerate(zip(captions, subjects)):
        text, spans = cond.format_caption(caption, phrases, "plain")
        for a, b in reversed(spans):
            text = f"{text[:a]}({text[a:b]}){op} {text[b:]}"
        embeds, _ = compel_xl(text)
        assert rel_l2(ours["encoder_hidden_states"][row], embeds) <= 1e-5, text
        assert rel_l2(ours["encoder_hidden_states"][row], plain["encoder_hidden_states"][row]) > 1e-3
        # The pooled embedding is the caption's, unweighted, as diffusers encodes it. (Compel would
        # pool the syntax string it was handed, parentheses and all; a caption has none.)
        assert rel_l2(ours["text_embeds"][row], diffusers_pooled[row].numpy()) <= 1e-5
        np.testing.assert_array_equal(ours["text_embeds"][row], plain["text_embeds"][row])


# ------------------------------------------------------------------------------ export
def _tensors(folder, component):
    name = "model.safetensors" if component.startswith("text") else "diffusion_pytorch_model.safetensors"
    return {k.removeprefix("text_model."): v for k, v in load_file(folder / component / name).items()}


def test_export_is_bitwise_and_loads_in_diffusers(loaded, tiny_xl_folder, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    pipe, params, _ = loaded
    folder, _ = tiny_xl_folder
    out = pipe.save_pretrained(params, tmp_path / "export")
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        original, exported = _tensors(folder, component), _tensors(out, component)
        assert original.keys() == exported.keys(), component
        for k in original:
            assert np.array_equal(original[k], exported[k]), (component, k)
    reloaded = StableDiffusionXLPipeline.from_pretrained(out)
    assert reloaded.config.force_zeros_for_empty_prompt is True
    latents = _latents(pipe, len(PROMPTS), seed=4)
    ours = pipe.generate(params, PROMPTS, num_steps=5, guidance_scale=5.0, latents=latents)  # Euler, the default
    assert np.abs(ours / 255.0 - _diffusers_images(reloaded, latents, 5, 5.0, "euler")).mean() <= 1 / 255
    again, params_again = StableDiffusion.from_pretrained(out)
    assert again.is_xl
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), params, params_again)
    assert all(jax.tree.leaves(same))


def test_refuses_mismatched_parts(loaded, tmp_path):
    import json
    import shutil

    pipe, params, _ = loaded
    out = pipe.save_pretrained(params, tmp_path / "bad")
    cfg = json.loads((out / "unet" / "config.json").read_text())
    cfg["projection_class_embeddings_input_dim"] += 6 * cfg["addition_time_embed_dim"]
    (out / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SafeJaxError, match="pooled text embedding"):
        StableDiffusion.from_pretrained(out)
    shutil.rmtree(out / "text_encoder_2")
    index = json.loads((out / "model_index.json").read_text())
    index["text_encoder"] = [None, None]
    (out / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(SafeJaxError, match="refiner"):
        StableDiffusion.from_pretrained(out)


# ------------------------------------------------------------------------------ the real architecture
def test_sdxl_preset_has_diffusers_parameter_counts():
    """Shapes only (eval_shape here, the meta device there): SDXL base's 2.567B-parameter UNet."""
    from diffusers import UNet2DConditionModel as TorchUNet
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from safe_jax.io import presets
    from safe_jax.models import clip_text
    from safe_jax.models.unet import UNet2DConditionModel, UNetConfig

    spec = presets.preset("sdxl")
    cfg = UNetConfig.from_diffusers(spec["unet"])
    shapes = jax.eval_shape(UNet2DConditionModel(cfg).init, jax.random.key(0), jnp.zeros((1, 4, 4, 4)),
                            jnp.zeros((1,)), cfg.example_conditioning())
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    with torch.device("meta"):
        ref = sum(p.numel() for p in TorchUNet.from_config(cfg.to_diffusers()).parameters())
        te = [sum(p.numel() for p in cls(CLIPTextConfig(**clip_text.preset(name).to_hf())).parameters())
              for cls, name in ((CLIPTextModel, "sdxl"), (CLIPTextModelWithProjection, "sdxl-2"))]
    assert ours == ref and round(ours / 1e9, 3) == 2.567
    for model, name, n in ((clip_text.CLIPTextModel, "sdxl", te[0]), (clip_text.CLIPTextModelWithProjection, "sdxl-2", te[1])):
        tree = clip_text.abstract_params(model(clip_text.preset(name)))
        assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree)) == n, name


# ------------------------------------------------------------------------------ SAFE fine-tuning, end to end
@pytest.mark.slow
def test_safe_fine_tune_of_an_sdxl_folder_exports_back_to_diffusers(tiny_xl_folder, tmp_path):
    """`safe-jax train` on a local SDXL folder with the SD 1.5 demo's command: LoRA, denoising then
    ReFL (DFE), subject-weighted. The merged export loads in StableDiffusionXLPipeline and draws our
    images; the LoRA file, loaded by diffusers onto the base folder, draws the same images."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from diffusers import StableDiffusionXLPipeline

    pytest.importorskip("peft")
    root = Path(__file__).resolve().parents[1]
    folder, _ = tiny_xl_folder
    data_dir, workdir = tmp_path / "tfds", tmp_path / "run"
    cmd = [sys.executable, "-m", "launch.train", "--config", "launch/configs/tiny_safe.py",
           f"--config.model={folder}", f"--config.workdir={workdir}", f"--config.data.data_dir={data_dir}",
           "--config.data.resolution=32", "--config.data.batch_size=2", "--config.steps=2",
           "--config.loss.refl_steps=2", "--config.loss.refl_step_min=1", "--config.loss.refl_step_max=1",
           "--config.sample.every=0", "--config.checkpoint.every=2", "--config.optim.warmup_steps=0",
           "--config.optim.lr=0.05", "--config.log_every=1"]
    res = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1"))
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("reward") is not None for m in metrics)  # a ReFL step ran (null on denoising steps)
    assert any(m.get("denoising_loss") is not None for m in metrics)

    export = workdir / "export"
    pipe, params = StableDiffusion.from_pretrained(export)
    base_pipe, base_params = StableDiffusion.from_pretrained(folder)
    latents = _latents(pipe, len(PROMPTS), seed=6)
    kw = dict(num_steps=4, guidance_scale=5.0, latents=latents)
    ours = pipe.generate(params, PROMPTS, **kw)
    base = base_pipe.generate(base_params, PROMPTS, **kw)
    assert np.abs(ours.astype(int) - base).mean() > 0.5  # the fine-tune changed the model
    merged = StableDiffusionXLPipeline.from_pretrained(export)
    assert np.abs(ours / 255.0 - _diffusers_images(merged, latents, 4, 5.0, "euler")).mean() <= 1 / 255
    with_lora = StableDiffusionXLPipeline.from_pretrained(folder)
    with_lora.load_lora_weights(str(export / "pytorch_lora_weights.safetensors"))
    assert np.abs(ours / 255.0 - _diffusers_images(with_lora, latents, 4, 5.0, "euler")).mean() <= 1 / 255
