"""LoRA on the UNet attention projections: merge, gradients, diffusers/PEFT export, SD1.5 size."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rel_l2
from flax import traverse_util

from safe_jax import SafeJaxError
from safe_jax.io import presets
from safe_jax.io.convert import flax_to_torch
from safe_jax.models.unet import UNet2DConditionModel, UNetConfig
from safe_jax.sampling.stable_diffusion import StableDiffusion
from safe_jax.train import lora

RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def tiny():
    pipe, params = StableDiffusion.from_pretrained("tiny")
    rng = np.random.default_rng(0)
    inputs = (rng.standard_normal((2, 8, 8, 4), np.float32), np.array([10.0, 700.0], np.float32),
              rng.standard_normal((2, 5, 32), np.float32))
    fwd = jax.jit(lambda p, x, t, c: pipe.unet.apply({"params": p}, x, t, c))
    return pipe, params, inputs, fwd


def _random_b(lora_params, seed=1):
    """A trained-looking LoRA: B drawn at random instead of zero."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(0.1 * rng.standard_normal(x.shape, np.float32)) if path[-1].key == "lora_B" else x,
        lora_params)


def test_targets_and_zero_b_leave_the_unet_unchanged(tiny):
    pipe, params, inputs, fwd = tiny
    lp = lora.init_lora(params["unet"], jax.random.key(0), rank=RANK)
    names = {"/".join(m[-2:]) for m in lora.target_modules(params["unet"])}
    assert names == {f"{a}/{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out_0")}
    assert len(lora.target_modules(params["unet"])) == 6 * 8  # 2 down + 1 mid + 3 up transformer blocks
    assert lora.lora_rank(lp) == RANK
    merged = lora.merge(params["unet"], lp, lora.lora_scale(RANK, ALPHA))
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), merged, params["unet"]))
    np.testing.assert_array_equal(fwd(merged, *inputs), fwd(params["unet"], *inputs))


def test_merge_equals_explicit_w_plus_ab(tiny):
    pipe, params, inputs, fwd = tiny
    lp = _random_b(lora.init_lora(params["unet"], jax.random.key(0), rank=RANK))
    scale = lora.lora_scale(RANK, ALPHA)
    assert scale == 2.0
    explicit = traverse_util.flatten_dict(jax.tree.map(np.asarray, params["unet"]))
    factors = traverse_util.flatten_dict(lp)
    for path, leaf in factors.items():
        if path[-1] == "lora_A":
            a, b = np.asarray(leaf, np.float64), np.asarray(factors[path[:-1] + ("lora_B",)], np.float64)
            w = explicit[path[:-1] + ("kernel",)]
            explicit[path[:-1] + ("kernel",)] = (w + scale * a @ b).astype(np.float32)
    explicit = traverse_util.unflatten_dict(explicit)
    merged = jax.jit(lora.merge)(params["unet"], lp, scale)  # traceable: jit, as in a train step
    base, ours, ref = fwd(params["unet"], *inputs), fwd(merged, *inputs), fwd(explicit, *inputs)
    assert rel_l2(ours, ref) <= 1e-6
    assert rel_l2(ours, base) > 1e-3  # the LoRA does something


def test_gradient_flows_to_lora_through_merge(tiny):
    pipe, params, (x, t, c), _ = tiny
    frozen, scale = params["unet"], lora.lora_scale(RANK, ALPHA)

    @jax.jit
    def grad(lp):
        loss = lambda lp: jnp.mean(pipe.unet.apply({"params": lora.merge(frozen, lp, scale)}, x, t, c) ** 2)
        return jax.grad(loss)(lp)

    lp = lora.init_lora(frozen, jax.random.key(0), rank=RANK)
    g = traverse_util.flatten_dict(grad(lp))
    # At init B = 0: dL/dB = scale·Aᵀ dL/dW is nonzero, dL/dA = scale·dL/dW Bᵀ is exactly zero (as in PEFT).
    assert all(float(jnp.abs(v).max()) > 0 for p, v in g.items() if p[-1] == "lora_B")
    assert all(float(jnp.abs(v).max()) == 0 for p, v in g.items() if p[-1] == "lora_A")
    g = traverse_util.flatten_dict(grad(_random_b(lp)))
    assert all(float(jnp.abs(v).max()) > 0 for v in g.values())


def _peft_emulation(torch_unet, state_dict, scale_from_kwargs=True):
    """What diffusers + PEFT do with our file, without peft: W += (lora_alpha / r) · B @ A per module.

    Follows ``UNet2DConditionModel.load_lora_adapter``: strip the ``unet.`` prefix, keep PEFT keys
    as they are (they contain ``lora_A``), derive r / lora_alpha with diffusers' ``get_peft_kwargs``.
    """
    from diffusers.utils.peft_utils import get_peft_kwargs

    sd = {k.removeprefix("unet."): v for k, v in state_dict.items() if k.startswith("unet.")}
    assert "lora_A" in next(iter(sd))  # else diffusers would convert from the old format
    rank = {f"^{k}": v.shape[1] for k, v in sd.items() if "lora_B" in k and v.ndim > 1}
    kw = get_peft_kwargs(rank, network_alpha_dict=None, peft_state_dict=sd, is_unet=True)
    assert kw["r"] == RANK and kw["lora_alpha"] == RANK and not kw["rank_pattern"] and not kw["use_dora"]
    modules = dict(torch_unet.named_modules())
    with torch.no_grad():
        for name in kw["target_modules"]:
            module = modules[name]
            assert isinstance(module, torch.nn.Linear), name
            a, b = sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"]
            assert a.shape == (RANK, module.in_features) and b.shape == (module.out_features, RANK)
            module.weight += (kw["lora_alpha"] / kw["r"]) * (b @ a)
    return kw


def test_diffusers_lora_file_and_merged_export(tiny, tmp_path):
    from diffusers import StableDiffusionPipeline
    from diffusers import UNet2DConditionModel as TorchUNet
    from safetensors.numpy import load_file

    pipe, params, (x, t, c), fwd = tiny
    scale = lora.lora_scale(RANK, ALPHA)
    lp = _random_b(lora.init_lora(params["unet"], jax.random.key(0), rank=RANK))

    sd = lora.to_diffusers_lora_state_dict(lp, scale)
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert sd[f"{key}.lora_A.weight"].shape == (RANK, 32) and sd[f"{key}.lora_B.weight"].shape == (32, RANK)
    assert sd["unet.up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0.lora_B.weight"].shape == (32, RANK)
    assert sd["unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"].shape == (RANK, 32)
    assert len(sd) == 2 * 48 and all(k.startswith("unet.") and ".lora_" in k for k in sd)

    file = lora.save_lora(lp, tmp_path / "lora", scale)
    assert file.name == "pytorch_lora_weights.safetensors"
    # diffusers' own reader (no peft needed for this part) returns our keys untouched, no alphas.
    state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(str(tmp_path / "lora"), return_lora_metadata=True)
    assert alphas is None and metadata is None and set(state) == set(sd)
    assert all(np.array_equal(state[k].numpy(), sd[k]) for k in sd)

    ref_unet = TorchUNet.from_config(pipe.unet.config.to_diffusers()).eval()
    ref_unet.load_state_dict({k: torch.tensor(v) for k, v in flax_to_torch(params["unet"]).items()})
    _peft_emulation(ref_unet, state)
    with torch.no_grad():
        ref = ref_unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t), torch.from_numpy(c)).sample
    ours = np.asarray(fwd(lora.merge(params["unet"], lp, scale), x, t, c)).transpose(0, 3, 1, 2)
    assert rel_l2(ours, ref.numpy()) <= 1e-5

    # Round trip: reading the file back gives the LoRA with the scale folded into B.
    back = lora.load_lora(file)
    assert rel_l2(fwd(lora.merge(params["unet"], back), x, t, c), ours.transpose(0, 2, 3, 1)) <= 1e-6

    # The merged export is a plain diffusers folder holding W + scale·A@B.
    out = lora.export_merged(pipe, params, lp, tmp_path / "merged", scale)
    merged = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    expected = {k: v.numpy() for k, v in ref_unet.state_dict().items()}
    assert merged.keys() == expected.keys()
    assert max(float(np.abs(merged[k] - expected[k]).max()) for k in merged) <= 1e-6


def test_diffusers_load_lora_weights_reads_our_file(tiny, tmp_path):
    """The real thing: diffusers + peft load our LoRA file onto the base model and give our output."""
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline

    pipe, params, (x, t, c), fwd = tiny
    scale = lora.lora_scale(RANK, ALPHA)
    lp = _random_b(lora.init_lora(params["unet"], jax.random.key(1), rank=RANK))
    pipe.save_pretrained(params, tmp_path / "base")
    lora.save_lora(lp, tmp_path / "lora", scale)

    torch_pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "base"), safety_checker=None)
    torch_pipe.load_lora_weights(str(tmp_path / "lora"))
    with torch.no_grad():
        ref = torch_pipe.unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                              torch.from_numpy(c)).sample.numpy()
    ours = np.asarray(fwd(lora.merge(params["unet"], lp, scale), x, t, c)).transpose(0, 3, 1, 2)
    base = np.asarray(fwd(params["unet"], x, t, c)).transpose(0, 3, 1, 2)
    assert rel_l2(ours, base) > 1e-3  # the LoRA changes the output: the comparison below means something
    assert rel_l2(ours, ref) <= 1e-5


def test_bad_inputs_are_clear_errors(tiny):
    pipe, params, _, _ = tiny
    with pytest.raises(SafeJaxError, match="match no dense kernel"):
        lora.init_lora(params["unet"], jax.random.key(0), targets=r"attn3/")
    lp = lora.init_lora(params["unet"], jax.random.key(0), rank=RANK)
    with pytest.raises(SafeJaxError, match="has no kernel"):
        lora.merge(params["vae"], lp)
    with pytest.raises(SafeJaxError, match="not a PEFT"):
        lora.from_diffusers_lora_state_dict({"unet.x.lora.down.weight": np.zeros((2, 2))})
    with pytest.raises(SafeJaxError, match="missing"):
        lora.load_lora("/nonexistent/lora")


def test_sd15_rank4_attention_lora_size():
    cfg = UNetConfig.from_diffusers(presets.preset("sd15")["unet"])
    model = UNet2DConditionModel(cfg)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)),
                              jnp.zeros((1, 1, 768)))["params"]
    lp = jax.eval_shape(lambda k: lora.init_lora(abstract, k, rank=4), jax.random.key(0))
    # 16 transformer blocks × (q, k, v, out) × (self, cross): r · (in + out) each.
    assert len(lora.target_modules(abstract)) == 16 * 8
    count = lora.num_params(lp)
    # By hand, r = 4 and block width c: self-attention 4 · r(c + c) = 32c; cross-attention q, out
    # 2 · r(c + c) = 16c and k, v 2 · r(768 + c) = 8c + 6144; so 56c + 6144 per block. Widths:
    # down 2 × (320 + 640 + 1280), up 3 × (1280 + 640 + 320), mid 1280: Σc = 12480.
    assert count == 56 * 12480 + 16 * 6144 == 797_184
    print(f"rank-4 attention LoRA on SD1.5: {count:,} parameters "
          f"({count / lora.num_params(abstract):.3%} of the UNet's {lora.num_params(abstract):,})")
