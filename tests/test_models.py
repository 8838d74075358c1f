"""UNet and VAE against diffusers PyTorch with identical random weights; full-size parameter counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rel_l2
from diffusers import AutoencoderKL as TorchVAE
from diffusers import UNet2DConditionModel as TorchUNet

from safe_jax.io import presets
from safe_jax.io.convert import flax_to_torch, torch_to_flax
from safe_jax.models.unet import UNet2DConditionModel, UNetConfig
from safe_jax.models.vae import AutoencoderKL, VAEConfig

SD1_STYLE = dict(  # per-block head *count* as one number, conv projections
    block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8, cross_attention_dim=24,
    attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
SD2_STYLE = dict(  # per-block head counts, linear projections, fp32 attention, 2 transformer layers
    SD1_STYLE, attention_head_dim=(2, 4, 8), use_linear_projection=True, upcast_attention=True,
    transformer_layers_per_block=2, flip_sin_to_cos=True, freq_shift=0,
)


def _perturbed(module: torch.nn.Module, seed: int) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return {k: v.numpy() for k, v in module.state_dict().items()}


def _nhwc(x):
    return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def _nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("torch_cfg", [SD1_STYLE, SD2_STYLE], ids=["sd1", "sd2"])
def test_unet_matches_diffusers(torch_cfg):
    torch.manual_seed(0)
    ref_model = TorchUNet(**torch_cfg).eval()
    state = _perturbed(ref_model, 1)
    model = UNet2DConditionModel(UNetConfig.from_diffusers(dict(ref_model.config)))
    rng = np.random.RandomState(0)
    x = rng.randn(2, 4, 16, 16).astype(np.float32)
    context = rng.randn(2, 7, 24).astype(np.float32)
    t = np.array([3, 801])
    abstract = jax.eval_shape(model.init, jax.random.key(0), _nhwc(x), t, context)["params"]
    params = torch_to_flax(state, abstract, what="unet")
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(context)).sample.numpy()
    ours = _nchw(jax.jit(model.apply)({"params": params}, _nhwc(x), t, context))
    assert rel_l2(ours, ref) <= 1e-5
    # Fractional timesteps (Euler samplers) go through the same embedding.
    tf = np.array([3.5, 800.25], np.float32)
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(x), torch.from_numpy(tf), torch.from_numpy(context)).sample.numpy()
    assert rel_l2(_nchw(model.apply({"params": params}, _nhwc(x), tf, context)), ref) <= 1e-5
    # The mapping is total and bitwise in both directions.
    back = flax_to_torch(params)
    assert back.keys() == state.keys()
    assert all(np.array_equal(back[k], state[k]) for k in state)


def test_unet_remat_and_bf16_keep_the_function():
    cfg = UNetConfig.from_diffusers(dict(SD1_STYLE, block_out_channels=(16, 32), layers_per_block=1,
                                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")))
    kx, kc = jax.random.split(jax.random.key(1))
    x, t, c = jax.random.normal(kx, (1, 8, 8, 4)), jnp.array([10]), jax.random.normal(kc, (1, 3, 24))
    base = UNet2DConditionModel(cfg)
    params = jax.jit(base.init)(jax.random.key(0), x, t, c)["params"]
    remat = UNet2DConditionModel(cfg, remat_policy="full")
    assert jax.tree.structure(jax.eval_shape(remat.init, jax.random.key(0), x, t, c)["params"]) == jax.tree.structure(params)
    loss = lambda m: jax.jit(jax.grad(lambda p: jnp.sum(m.apply({"params": p}, x, t, c) ** 2)))(params)
    g1, g2 = loss(base), loss(remat)
    flat = lambda g: np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(g)])
    assert rel_l2(flat(g2), flat(g1)) <= 1e-5
    bf16 = UNet2DConditionModel(cfg, dtype=jnp.bfloat16)
    out = jax.jit(bf16.apply)({"params": params}, x, t, c)
    assert out.dtype == jnp.bfloat16
    assert rel_l2(out.astype(jnp.float32), jax.jit(base.apply)({"params": params}, x, t, c)) < 0.05


def test_vae_matches_diffusers():
    cfg = dict(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8, latent_channels=4,
               down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
    torch.manual_seed(0)
    ref_model = TorchVAE(**cfg).eval()
    state = _perturbed(ref_model, 2)
    model = AutoencoderKL(VAEConfig.from_diffusers(dict(ref_model.config)))
    x = np.random.RandomState(0).uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), _nhwc(x))["params"]
    params = torch_to_flax(state, abstract, what="vae")
    with torch.no_grad():
        posterior = ref_model.encode(torch.from_numpy(x)).latent_dist
        z = torch.from_numpy(np.random.RandomState(1).randn(2, 4, 8, 8).astype(np.float32))
        decoded = ref_model.decode(z).sample.numpy()
    mean, logvar = model.apply({"params": params}, _nhwc(x), method=AutoencoderKL.encode)
    assert rel_l2(_nchw(mean), posterior.mean.numpy()) <= 1e-5
    assert rel_l2(_nchw(logvar), posterior.logvar.numpy()) <= 1e-5
    ours = model.apply({"params": params}, _nhwc(z.numpy()), method=AutoencoderKL.decode)
    assert rel_l2(_nchw(ours), decoded) <= 1e-5
    back = flax_to_torch(params)
    assert back.keys() == state.keys() and all(np.array_equal(back[k], state[k]) for k in state)


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", ["sd15", "sd21", "sd21-base"])
def test_full_size_parameter_counts(name):
    from transformers import CLIPTextConfig
    from transformers import CLIPTextModel as TorchCLIP

    from safe_jax.models import clip_text

    spec = presets.preset(name)
    unet = UNet2DConditionModel(UNetConfig.from_diffusers(spec["unet"]))
    vae = AutoencoderKL(VAEConfig.from_diffusers(spec["vae"]))
    text = clip_text.CLIPTextModel(clip_text.preset(spec["text_encoder"]))
    s = 2 ** 3
    ours = {
        "unet": _count(jax.eval_shape(unet.init, jax.random.key(0), jnp.zeros((1, s, s, 4)), jnp.zeros((1,)),
                                      jnp.zeros((1, 1, unet.config.cross_attention_dim)))),
        "vae": _count(jax.eval_shape(vae.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))),
        "text": _count(clip_text.abstract_params(text)),
    }
    with torch.device("meta"):
        ref = {
            "unet": sum(p.numel() for p in TorchUNet.from_config(unet.config.to_diffusers()).parameters()),
            "vae": sum(p.numel() for p in TorchVAE.from_config(vae.config.to_diffusers()).parameters()),
            "text": sum(p.numel() for p in TorchCLIP(CLIPTextConfig(**text.config.to_hf())).parameters()),
        }
    assert ours == ref
    if name == "sd15":  # the published sizes
        assert ours["unet"] == 859_520_964 and ours["vae"] == 83_653_863 and ours["text"] == 123_060_480
