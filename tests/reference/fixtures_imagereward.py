"""Reference fixtures for ImageReward, written by the ``image-reward`` package's own code.

Run with the reference environment only (``make reference-fixtures``); the project's tests read
what this writes and never import the reference. Nothing is downloaded: the package's classes are
built with random weights at a toy size, with the few sizes the package hard-codes patched:

- ``blip.create_vit('large', 224)`` -> the package's own ``VisionTransformer`` at a toy size;
- ``MLP(768)`` -> the package's own ``MLP`` on the toy text width;
- ``BertTokenizer.from_pretrained('bert-base-uncased')`` -> the same class on a small WordPiece
  vocabulary written here (BLIP's ``init_tokenizer`` still adds its [DEC] and [ENC] tokens);
- ``model.preprocess`` -> the package's ``_transform`` at the toy image size.

Everything else (the forward passes, ``score``, ``inference_rank``, ``score_gard``, the tokenizer
call, the image transform) is the package's code. Writes tests/fixtures/reference/imagereward/:
ImageReward.pt (``torch.save`` of the state dict, as the released checkpoint is), med_config.json,
tokenizer/ (vocab.txt + tokenizer_config.json, the layout of bert-base-uncased) and outputs.npz.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import string
import tempfile
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image

from ImageReward.models.BLIP import blip as blip_module
from ImageReward.models.BLIP import blip_pretrain as blip_pretrain_module
from ImageReward.models.BLIP.vit import VisionTransformer
from transformers import BertTokenizer

# The package's __init__ binds the name ImageReward.ImageReward to the class, not the module.
ir_module = importlib.import_module("ImageReward.ImageReward")

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "reference" / "imagereward"
SEED = 0

# The toy architecture (safe_jax.models.blip.PRESETS["tiny"] must match it).
IMAGE_SIZE, PATCH, VISION_WIDTH, VISION_DEPTH, VISION_HEADS = 64, 16, 48, 2, 3
MED_CONFIG = {
    # The keys of the released med_config.json; encoder_width stays 768 as there: BLIP overwrites it
    # with the ViT's width, which is what the fixture checks.
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 37,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 40,
    "model_type": "bert",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": None,  # len(tokenizer), set below
    "encoder_width": 768,
    "add_cross_attention": True,
}

WORDS = ("a an the of on in and with by photo cat dog red blue green sitting mat astronaut riding horse "
         "highly detailed trending art station dramatic lighting sharp focus portrait painting city night "
         "beautiful woman man house tree sky").split()
PIECES = ("ing ed er ly station").split()

PROMPTS = [  # the model fixture: one prompt per image
    "a red cat sitting on a mat",
    "A photo of an astronaut riding a horse, highly detailed, 4k, trending on artstation, by greg "
    "rutkowski and alphonse mucha, dramatic lighting, sharp focus, intricate, elegant, cinematic",
    "Portrait painting of a beautiful woman!",
]
TOKEN_PROMPTS = PROMPTS + [  # tokenisation only: edge cases of BERT's basic tokenizer
    "",
    "   Café  CRÈME brûlée — naïve façade   ",
    "a [ENC] cat [DEC] on a [SEP] mat [UNK]",
    "3.14 apples, (red) & blue/green; \"quoted\" it's 100% done?!",
    "東京 night city ⭐ emoji 🐱 tab\tnew\nline",
    "dog " * 40,
]
MODEL_IMAGES = [(80, 64), (64, 64), (50, 90)]  # (H, W) of the model fixture's images
PREPROCESS_IMAGES = [(37, 53, 64), (97, 130, 64), (130, 97, 64), (64, 64, 64), (200, 80, 64), (17, 19, 64),
                     (300, 250, 224)]  # (H, W, n_px)


def vocabulary() -> list[str]:
    chars = string.ascii_lowercase + string.digits + string.punctuation
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += list(chars) + [f"##{c}" for c in string.ascii_lowercase + string.digits]
    tokens += WORDS + [f"##{p}" for p in PIECES]
    return list(dict.fromkeys(tokens))  # each once, first place kept


def write_tokenizer(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocabulary()) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}) + "\n")


def image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth colours plus noise, so the resize has structure to get right and clipping to do."""
    y, x = np.mgrid[0:h, 0:w] / np.array([max(h - 1, 1), max(w - 1, 1)])[:, None, None]
    base = np.stack([x, y, 1 - x * y], -1) * 200 + rng.normal(0, 40, (h, w, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


def build(tokenizer_dir: Path, med_config_path: Path):
    original_create_vit, original_mlp = blip_pretrain_module.create_vit, ir_module.MLP

    def create_vit(vit, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
        assert (vit, image_size) == ("large", 224), (vit, image_size)
        return VisionTransformer(img_size=IMAGE_SIZE, patch_size=PATCH, embed_dim=VISION_WIDTH, depth=VISION_DEPTH,
                                 num_heads=VISION_HEADS, use_grad_checkpointing=use_grad_checkpointing,
                                 ckpt_layer=ckpt_layer, drop_path_rate=0.1), VISION_WIDTH

    class MLP(original_mlp):
        def __init__(self, input_size):
            assert input_size == 768, input_size
            super().__init__(MED_CONFIG["hidden_size"])

    class LocalBertTokenizer(BertTokenizer):
        @classmethod
        def from_pretrained(cls, name, *args, **kwargs):
            assert name == "bert-base-uncased", name
            return BertTokenizer.from_pretrained(str(tokenizer_dir), *args, **kwargs)

    blip_pretrain_module.create_vit, ir_module.MLP = create_vit, MLP
    original_tokenizer, blip_module.BertTokenizer = blip_module.BertTokenizer, LocalBertTokenizer
    try:
        model = ir_module.ImageReward(med_config=str(med_config_path), device="cpu")
    finally:
        blip_pretrain_module.create_vit, ir_module.MLP = original_create_vit, original_mlp
        blip_module.BertTokenizer = original_tokenizer
    model.preprocess = ir_module._transform(IMAGE_SIZE)
    return model.eval()


def perturb(model: torch.nn.Module) -> None:
    """Weights at a working scale (not the near-zero heads of the default init), norms off identity."""
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim >= 2 and "embed" not in name and "cls_token" not in name:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(noise / fan_in ** 0.5)
            elif "embed" in name or "cls_token" in name:
                p.copy_(0.5 * noise)
            else:  # biases, norm scales and shifts
                p.add_(0.1 * noise)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_known_args()  # `make reference-fixtures` passes every script the same options
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    tokenizer_dir = OUT / "tokenizer"
    write_tokenizer(tokenizer_dir)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # vocab_size as the released file has it: the vocabulary plus BLIP's [DEC] and [ENC].
        MED_CONFIG["vocab_size"] = len(vocabulary()) + 2
        med_config_path = OUT / "med_config.json"
        med_config_path.write_text(json.dumps(MED_CONFIG, indent=2) + "\n")
        model = build(tokenizer_dir, med_config_path)
        assert len(model.blip.tokenizer) == MED_CONFIG["vocab_size"], len(model.blip.tokenizer)
        assert model.blip.text_encoder.config.encoder_width == VISION_WIDTH
        perturb(model)
        torch.save(model.state_dict(), OUT / "ImageReward.pt")

        out: dict[str, np.ndarray] = {}
        tok = model.blip.tokenizer
        # Tokenisation, exactly as score() / inference_rank() call the tokenizer.
        encoded = [tok(p, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
                   for p in TOKEN_PROMPTS]
        out["token_prompts"] = np.array(json.dumps(TOKEN_PROMPTS))
        out["token_input_ids"] = np.concatenate([e.input_ids.numpy() for e in encoded]).astype(np.int32)
        out["token_attention_mask"] = np.concatenate([e.attention_mask.numpy() for e in encoded]).astype(np.int32)
        out["enc_token_id"] = np.array(tok.enc_token_id, np.int32)
        out["bos_token_id"] = np.array(tok.bos_token_id, np.int32)

        # Preprocessing: the package's _transform on PIL images of odd sizes.
        for i, (h, w, n_px) in enumerate(PREPROCESS_IMAGES):
            src = image(rng, h, w)
            out[f"pre_src_{i}"] = src
            out[f"pre_out_{i}"] = ir_module._transform(n_px)(Image.fromarray(src)).permute(1, 2, 0).numpy()

        # The model: per-image score() through image files, batched intermediates, inference_rank
        # and score_gard on the same inputs.
        srcs = [image(rng, h, w) for h, w in MODEL_IMAGES]
        paths = []
        for i, src in enumerate(srcs):
            paths.append(str(tmp / f"image_{i}.png"))
            Image.fromarray(src).save(paths[-1])
            out[f"model_src_{i}"] = src
        out["model_prompts"] = np.array(json.dumps(PROMPTS))
        with torch.no_grad():
            pixels = torch.stack([model.preprocess(Image.open(p)) for p in paths])
            text = tok(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
            image_embeds = model.blip.visual_encoder(pixels)
            image_atts = torch.ones(image_embeds.size()[:-1], dtype=torch.long)
            hidden = model.blip.text_encoder(text.input_ids, attention_mask=text.attention_mask,
                                             encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts,
                                             return_dict=True).last_hidden_state
            features = hidden[:, 0, :].float()
            rewards = ((model.mlp(features) - model.mean) / model.std)[:, 0]
            per_image = np.array([model.score(p, path) for p, path in zip(PROMPTS, paths)], np.float32)
            np.testing.assert_allclose(per_image, rewards.numpy(), rtol=1e-5, atol=1e-6)
            _, ranked = model.inference_rank(PROMPTS[0], paths)
            gard = model.score_gard(text.input_ids, text.attention_mask, pixels)[:, 0]
        out["pixel_values"] = pixels.permute(0, 2, 3, 1).numpy()  # NHWC, as ours takes them
        out["input_ids"] = text.input_ids.numpy().astype(np.int32)
        out["attention_mask"] = text.attention_mask.numpy().astype(np.int32)
        out["image_embeds"] = image_embeds.numpy()
        out["text_features"] = features.numpy()
        out["mlp_out"] = model.mlp(features).detach()[:, 0].numpy()
        out["rewards"] = rewards.numpy()
        out["score"] = per_image  # ImageReward.score(prompt_i, image file i)
        out["rank_rewards"] = np.asarray(ranked, np.float32)  # inference_rank(PROMPTS[0], all images)
        out["score_gard"] = gard.numpy()
        out["state_dict_keys"] = np.array(json.dumps(sorted(model.state_dict())))
        # PIL's bicubic resize is separable with uint8 rounding between its passes, and Pillow
        # versions differ in which pass they run first for some sizes.
        out["pillow_version"] = np.array(PIL.__version__)
    np.savez_compressed(OUT / "outputs.npz", **out)
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"wrote {OUT} ({total / 1e6:.2f} MB); rewards {out['rewards']}")


if __name__ == "__main__":
    main()
