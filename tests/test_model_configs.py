"""config.json validation: every bad field of a UNet, VAE or CLIP config is one clear line naming
the file and the field (SafeJaxError; exit code 2 from the CLI), and every preset still loads."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from safe_jax.errors import SafeJaxError
from safe_jax.io import presets
from safe_jax.models import clip_text, clip_vision
from safe_jax.models.unet import UNetConfig
from safe_jax.models.vae import VAEConfig
from safe_jax.sampling.stable_diffusion import StableDiffusion

TINY = presets.preset("tiny")
# Valid tiny configs as diffusers / transformers write them (every key present).
BASE = {
    "unet": UNetConfig.from_diffusers(TINY["unet"]).to_diffusers(),
    "vae": VAEConfig.from_diffusers(TINY["vae"]).to_diffusers(),
    "text_encoder": clip_text.preset("tiny").to_hf(),
}
LOAD = {
    "unet": UNetConfig.from_diffusers,
    "vae": VAEConfig.from_diffusers,
    "text_encoder": clip_text.CLIPTextConfig.from_hf,
}

# (component, field, bad value, what the message must say after "<component>/config.json: ")
CASES = [
    # UNet: block_out_channels [32, 64], norm_num_groups 8, attention_head_dim [2, 4]
    ("unet", "norm_num_groups", 7, "norm_num_groups=7 does not divide block_out_channels 32"),
    ("unet", "norm_num_groups", 0, "norm_num_groups must be a positive integer, got 0"),
    ("unet", "norm_num_groups", True, "norm_num_groups must be a positive integer, got True"),
    ("unet", "norm_num_groups", "8", "norm_num_groups must be a positive integer, got '8'"),
    ("unet", "norm_num_groups", None, "norm_num_groups must be a positive integer, got None"),
    ("unet", "attention_head_dim", 0, "attention_head_dim must be a positive integer or a list of them, got 0"),
    ("unet", "attention_head_dim", 3, "attention_head_dim=3: 32 channels do not split into 3 attention heads"),
    ("unet", "attention_head_dim", [2], "attention_head_dim has 1 entries, block_out_channels has 2"),
    ("unet", "attention_head_dim", [2, "4"], "attention_head_dim must be a positive integer or a list"),
    ("unet", "attention_head_dim", [], "attention_head_dim must be a positive integer or a list"),
    ("unet", "num_attention_heads", [2, 3], "num_attention_heads=3: 64 channels do not split into 3"),
    ("unet", "num_attention_heads", -1, "num_attention_heads must be a positive integer"),
    ("unet", "block_out_channels", 32, "block_out_channels must be a list of positive integers, got 32"),
    ("unet", "block_out_channels", "abc", "block_out_channels must be a list of positive integers, got 'abc'"),
    ("unet", "block_out_channels", [], "block_out_channels must be a list of positive integers, got []"),
    ("unet", "block_out_channels", [32, -64], "block_out_channels must be a list of positive integers"),
    ("unet", "block_out_channels", [32.0, 64], "block_out_channels must be a list of positive integers"),
    ("unet", "block_out_channels", [32, 64, 64], "down_block_types has 2 entries, block_out_channels has 3"),
    ("unet", "block_out_channels", [20, 64], "norm_num_groups=8 does not divide block_out_channels 20"),
    ("unet", "layers_per_block", "two", "layers_per_block must be a positive integer or a list of them, got 'two'"),
    ("unet", "layers_per_block", 0, "layers_per_block must be a positive integer"),
    ("unet", "layers_per_block", [1, 2], "unsupported UNet architecture: per-block layers_per_block=[1, 2]"),
    ("unet", "down_block_types", "abc", "down_block_types must be a list of block type names, got 'abc'"),
    ("unet", "down_block_types", ["CrossAttnDownBlock2D", 3], "down_block_types must be a list of block type names"),
    ("unet", "up_block_types", ["UpBlock2D"], "up_block_types has 1 entries, block_out_channels has 2"),
    ("unet", "up_block_types", ["UpBlock2D", "AttnUpBlock2D"], "unsupported UNet architecture: up_block_types contains AttnUpBlock2D"),
    ("unet", "in_channels", 0, "in_channels must be a positive integer, got 0"),
    ("unet", "in_channels", 4.5, "in_channels must be a positive integer, got 4.5"),
    ("unet", "out_channels", "4", "out_channels must be a positive integer"),
    ("unet", "cross_attention_dim", None, "cross_attention_dim must be a positive integer"),
    ("unet", "cross_attention_dim", [32, 64], "unsupported UNet architecture: per-block cross_attention_dim"),
    ("unet", "transformer_layers_per_block", 0, "transformer_layers_per_block must be a positive integer"),
    ("unet", "transformer_layers_per_block", [[1], [1]], "transformer_layers_per_block must be a positive integer or a list"),
    ("unet", "transformer_layers_per_block", [1, 1, 1], "transformer_layers_per_block has 3 entries"),
    ("unet", "norm_eps", 0, "norm_eps must be a positive number, got 0"),
    ("unet", "norm_eps", "1e-5", "norm_eps must be a positive number, got '1e-5'"),
    ("unet", "norm_eps", float("nan"), "norm_eps must be a positive number, got nan"),
    ("unet", "sample_size", 0, "sample_size must be a positive integer"),
    ("unet", "sample_size", "32", "sample_size must be a positive integer"),
    ("unet", "flip_sin_to_cos", "yes", "flip_sin_to_cos must be true or false, got 'yes'"),
    ("unet", "use_linear_projection", 1, "use_linear_projection must be true or false, got 1"),
    ("unet", "upcast_attention", "no", "upcast_attention must be true or false, got 'no'"),
    ("unet", "use_linear_projection", None, "use_linear_projection must be true or false, got None"),
    ("unet", "addition_embed_type", "text", "unsupported UNet architecture: addition_embed_type='text'"),
    ("unet", "addition_embed_type", "text_time", "addition_embed_type='text_time' needs addition_time_embed_dim"),
    ("unet", "addition_time_embed_dim", 8, "addition_time_embed_dim / projection_class_embeddings_input_dim are set"),
    ("unet", "addition_time_embed_dim", 0, "addition_time_embed_dim must be a positive integer, got 0"),
    ("unet", "freq_shift", -1, "freq_shift must be a number >= 0, got -1"),
    ("unet", "freq_shift", 16, "freq_shift=16 must be below block_out_channels"),
    ("unet", "downsample_padding", -1, "downsample_padding must be an integer >= 0, got -1"),
    ("unet", "time_embedding_dim", 0, "time_embedding_dim must be a positive integer, got 0"),
    ("unet", "dropout", 0.1, "unsupported UNet architecture: dropout=0.1"),
    ("unet", "only_cross_attention", True, "unsupported UNet architecture: only_cross_attention=True"),
    ("unet", "mid_block_scale_factor", True, "unsupported UNet architecture: mid_block_scale_factor=True"),
    # VAE: block_out_channels [16, 32], norm_num_groups 8
    ("vae", "norm_num_groups", 7, "norm_num_groups=7 does not divide block_out_channels 16"),
    ("vae", "norm_num_groups", 0, "norm_num_groups must be a positive integer, got 0"),
    ("vae", "norm_num_groups", 12, "norm_num_groups=12 does not divide block_out_channels 16"),
    ("vae", "block_out_channels", 16, "block_out_channels must be a list of positive integers, got 16"),
    ("vae", "block_out_channels", "abc", "block_out_channels must be a list of positive integers, got 'abc'"),
    ("vae", "block_out_channels", [16, 0], "block_out_channels must be a list of positive integers"),
    ("vae", "block_out_channels", [16, 32, 32], "unsupported VAE architecture: down_block_types="),
    ("vae", "down_block_types", "abc", "down_block_types must be a list of block type names, got 'abc'"),
    ("vae", "up_block_types", ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"], "unsupported VAE architecture: up_block_types"),
    ("vae", "layers_per_block", "one", "layers_per_block must be a positive integer, got 'one'"),
    ("vae", "layers_per_block", 0, "layers_per_block must be a positive integer, got 0"),
    ("vae", "latent_channels", 0, "latent_channels must be a positive integer"),
    ("vae", "in_channels", True, "in_channels must be a positive integer, got True"),
    ("vae", "out_channels", [3], "out_channels must be a positive integer"),
    ("vae", "sample_size", -1, "sample_size must be a positive integer"),
    ("vae", "scaling_factor", 0, "scaling_factor must be a positive number, got 0"),
    ("vae", "scaling_factor", "0.18215", "scaling_factor must be a positive number"),
    ("vae", "shift_factor", "x", "shift_factor must be a number, got 'x'"),
    ("vae", "force_upcast", "true", "force_upcast must be true or false, got 'true'"),
    ("vae", "act_fn", "relu", "unsupported VAE architecture: act_fn='relu'"),
    ("vae", "latents_mean", [0.0] * 4, "unsupported VAE architecture: latents_mean="),
    # CLIP text encoder: hidden_size 32, 4 heads
    ("text_encoder", "hidden_size", "32", "hidden_size must be a positive integer, got '32'"),
    ("text_encoder", "hidden_size", 30, "hidden_size 30 is not a multiple of num_attention_heads 4"),
    ("text_encoder", "hidden_size", None, "hidden_size must be a positive integer, got None"),
    ("text_encoder", "num_attention_heads", 0, "num_attention_heads must be a positive integer, got 0"),
    ("text_encoder", "num_hidden_layers", -1, "num_hidden_layers must be a positive integer"),
    ("text_encoder", "intermediate_size", True, "intermediate_size must be a positive integer, got True"),
    ("text_encoder", "vocab_size", 0, "vocab_size must be a positive integer"),
    ("text_encoder", "max_position_embeddings", "77", "max_position_embeddings must be a positive integer"),
    ("text_encoder", "projection_dim", 0, "projection_dim must be a positive integer"),
    ("text_encoder", "layer_norm_eps", 0, "layer_norm_eps must be a positive number, got 0"),
    ("text_encoder", "hidden_act", ["gelu"], "hidden_act ['gelu'] is not supported"),
    ("text_encoder", "hidden_act", "relu", "hidden_act 'relu' is not supported"),
    ("text_encoder", "eos_token_id", [2, 49407], "eos_token_id must be one id, got [2, 49407]"),
    ("text_encoder", "eos_token_id", -1, "eos_token_id must be an integer >= 0, got -1"),
    ("text_encoder", "bos_token_id", "a", "bos_token_id must be an integer >= 0, got 'a'"),
    ("text_encoder", "pad_token_id", 1.5, "pad_token_id must be an integer >= 0, got 1.5"),
]


def _check(message: str, source: str, expected: str) -> None:
    assert "\n" not in message, message
    assert message.startswith(f"{source}: "), message
    assert expected in message, message


@pytest.mark.parametrize("component,key,value,expected", CASES,
                         ids=[f"{c}-{k}-{v!r}"[:60] for c, k, v, _ in CASES])
def test_bad_field_is_one_line_naming_file_and_field(component, key, value, expected):
    source = f"{component}/config.json"
    with pytest.raises(SafeJaxError) as info:
        LOAD[component]({**BASE[component], key: value}, source)
    _check(str(info.value), source, expected)
    assert key in str(info.value)


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder"])
def test_config_must_be_an_object_and_complete(component):
    source = f"{component}/config.json"
    with pytest.raises(SafeJaxError, match=f"^{source}: must be a JSON object, got list$"):
        LOAD[component]([1, 2], source)
    if component == "text_encoder":
        cfg = {k: v for k, v in BASE[component].items() if k != "hidden_size"}
        with pytest.raises(SafeJaxError, match=f"^{source}: config lacks hidden_size$"):
            LOAD[component](cfg, source)


def test_odd_timestep_width_is_refused():
    cfg = {**BASE["unet"], "block_out_channels": [33, 66], "norm_num_groups": 1, "attention_head_dim": [1, 2]}
    with pytest.raises(SafeJaxError, match=r"^u: unsupported UNet architecture: block_out_channels\[0\]=33 is odd"):
        UNetConfig.from_diffusers(cfg, "u")


def test_heads_need_only_divide_blocks_with_attention():
    # diffusers builds this: the DownBlock2D / UpBlock2D pair (index 0 here) has no attention.
    cfg = {**BASE["unet"], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
           "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "attention_head_dim": [3, 4]}
    assert UNetConfig.from_diffusers(cfg).heads == (3, 4)


BASE_CLIP = clip_vision.PRESETS["tiny"].to_hf()
CLIP_CASES = [
    ("vision_config", "image_size", 0, "image_size must be a positive int (square), got 0"),
    ("vision_config", "image_size", [32, 16], "image_size must be a positive int (square), got [32, 16]"),
    ("vision_config", "patch_size", "8", "patch_size must be a positive int (square), got '8'"),
    ("vision_config", "patch_size", 64, "patch_size 64 > image_size 32"),
    ("vision_config", "hidden_size", "x", "hidden_size must be a positive integer, got 'x'"),
    ("vision_config", "hidden_size", 30, "hidden_size 30 is not a multiple of num_attention_heads 4"),
    ("vision_config", "num_channels", 0, "num_channels must be a positive integer, got 0"),
    ("vision_config", "layer_norm_eps", -1, "layer_norm_eps must be a positive number, got -1"),
    ("vision_config", "hidden_act", "relu", "hidden_act 'relu' is not supported"),
    ("text_config", "num_hidden_layers", 0, "num_hidden_layers must be a positive integer, got 0"),
    (None, "projection_dim", "16", "projection_dim must be a positive integer, got '16'"),
    (None, "logit_scale_init_value", "x", "logit_scale_init_value must be a number, got 'x'"),
]


@pytest.mark.parametrize("sub,key,value,expected", CLIP_CASES, ids=[f"{s}-{k}-{v!r}" for s, k, v, _ in CLIP_CASES])
def test_bad_clip_field_is_one_line(sub, key, value, expected):
    cfg = json.loads(json.dumps(BASE_CLIP))
    (cfg[sub] if sub else cfg)[key] = value
    with pytest.raises(SafeJaxError) as info:
        clip_vision.CLIPConfig.from_hf(cfg, "clip/config.json")
    _check(str(info.value), f"clip/config.json: {sub}" if sub else "clip/config.json", expected)


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_presets_load_and_round_trip(name):
    spec = presets.preset(name)
    unet, vae = UNetConfig.from_diffusers(spec["unet"]), VAEConfig.from_diffusers(spec["vae"])
    text = clip_text.preset(spec["text_encoder"])
    assert UNetConfig.from_diffusers(unet.to_diffusers(), "unet/config.json") == unet
    assert VAEConfig.from_diffusers(vae.to_diffusers(), "vae/config.json") == vae
    assert clip_text.CLIPTextConfig.from_hf(text.to_hf(), "text_encoder/config.json") == text


@pytest.mark.parametrize("name", list(clip_vision.PRESETS))
def test_clip_presets_round_trip(name):
    config = clip_vision.PRESETS[name]
    assert clip_vision.CLIPConfig.from_hf(config.to_hf(), "clip/config.json") == config


def test_tiny_preset_pipeline_loads():
    pipe, params = StableDiffusion.from_pretrained("tiny")
    assert pipe.unet.config.norm_num_groups == 8 and set(params) == {"unet", "vae", "text_encoder"}


@pytest.fixture
def folder(tiny_torch_folder, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_torch_folder[0], copy)
    return copy


def _edit(folder, component, **changes):
    path = folder / component / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("component,change,expected", [
    ("unet", {"norm_num_groups": 7}, "norm_num_groups=7 does not divide block_out_channels 32"),
    ("vae", {"block_out_channels": "abc"}, "block_out_channels must be a list of positive integers, got 'abc'"),
    ("text_encoder", {"layer_norm_eps": -1}, "layer_norm_eps must be a positive number, got -1"),
])
def test_from_pretrained_names_the_file(folder, component, change, expected):
    _edit(folder, component, **change)
    with pytest.raises(SafeJaxError) as info:
        StableDiffusion.from_pretrained(folder)
    _check(str(info.value), str(folder / component / "config.json"), expected)


@pytest.mark.parametrize("component,change,expected", [
    ("unet", {"attention_head_dim": 0}, "attention_head_dim must be a positive integer or a list of them, got 0"),
    ("vae", {"norm_num_groups": 7}, "norm_num_groups=7 does not divide block_out_channels 16"),
])
def test_cli_exits_2_with_one_line(folder, component, change, expected):
    _edit(folder, component, **change)
    res = subprocess.run([sys.executable, "-m", "launch.generate", "--model", str(folder), "--prompt", "x",
                          "--steps", "1", "--out", str(folder.parent / "out")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert str(folder / component / "config.json") in lines[0] and expected in lines[0], lines[0]


def test_null_sample_size_keeps_the_default():
    # diffusers writes sample_size null for a model built without one.
    assert UNetConfig.from_diffusers({**BASE["unet"], "sample_size": None}).sample_size == UNetConfig.sample_size
    assert VAEConfig.from_diffusers({**BASE["vae"], "sample_size": None}).sample_size == VAEConfig.sample_size
    assert UNetConfig.from_diffusers({**BASE["unet"], "sample_size": [48, 64]}).sample_size == 48


def test_unet_and_text_encoder_widths_must_match(folder):
    _edit(folder, "unet", cross_attention_dim=64)
    with pytest.raises(SafeJaxError, match=f"^{folder}: unet cross_attention_dim 64 does not match "
                                           "text_encoder hidden_size 32$"):
        StableDiffusion.from_pretrained(folder)
