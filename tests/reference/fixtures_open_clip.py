"""Reference fixtures for HPS v2 / OpenCLIP, written by the ``hpsv2`` package's own code.

Run with the reference environment only (``make reference-fixtures``); the project's tests read
what this writes and never import the reference. Nothing is downloaded. HPS v2 and v2.1 are
OpenCLIP ViT-H-14s scored by ``hpsv2.img_score.score``; here the same code runs on a toy CLIP:

- the toy architecture is registered as an OpenCLIP model config ("hps-tiny") in hpsv2's bundled
  OpenCLIP, and ``img_score.create_model_and_transforms`` builds it (with HPS's own arguments,
  the model name and the pretrained tag aside) instead of downloading ViT-H-14;
- the checkpoint is written as HPS ships it: ``torch.save({"state_dict": ...})``, fp16, and
  ``img_score.score`` loads it with its own strict ``load_state_dict`` and scores PIL images
  through its own ``preprocess_val`` and ``get_tokenizer("ViT-H-14")``;
- open-clip-torch's ``CLIP`` loads the same state dict and must give the same features, and its
  ``get_tokenizer("ViT-H-14")`` the same ids as hpsv2's.

Also records the tensor shapes and parameter count of the real ViT-H-14 (built on the meta
device, no weights). Writes tests/fixtures/reference/open_clip/: hps_tiny.pt and outputs.npz.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

warnings.filterwarnings("ignore")  # hpsv2 and timm import-time deprecation noise

from hpsv2 import img_score  # noqa: E402
from hpsv2.src import open_clip as hps_open_clip  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "reference" / "open_clip"
SEED = 0

# The toy architecture. Vocabulary and context are the real ones (the real tokenizer's ids must
# index it); the text width is kept small because the 49408-row embedding dominates the file.
# Vision 4 heads, text 3: the converter must take each tower's own count.
EMBED_DIM = 16
VISION_CFG = {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8}
TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 12, "heads": 3, "layers": 2}
TINY_NAME = "hps-tiny"

CAPTIONS = [
    "A photo of a cat",
    "  Firefighters at a   flooded street in Leeds.\n",
    "The cat\u2019s \u201chat\u201d \u2014 made of \ufb01ne silk &amp; wool &#8217;n&rsquo; more",
    "\uff26\uff35\uff2c\uff2c\uff37\uff29\uff24\uff34\uff28 text, cafe\u0301 cr\u00e8me, "
    "na\u00efve Zo\u00eb\u3000\u00e9t\u00e9",
    "Emoji \U0001F431\U0001F680 and numbers 1234567 x 3.14!!! \u200b(zero-width) \u00a0nbsp",
    "don't STOP rock'n'roll, it's 5 O'CLOCK; we'll see... <|endoftext|> &amp;lt;b&amp;gt;",
    "",
    "A highly detailed matte painting of a futuristic city at night, neon lights reflecting on wet "
    "streets, flying cars, towering skyscrapers, cinematic lighting, volumetric fog, by greg "
    "rutkowski and syd mead, trending on artstation, 8k, octane render, unreal engine, "
    "hyperrealistic, sharp focus, intricate details, award winning photograph, masterpiece, golden hour, "
    "depth of field, bokeh, 35mm lens, f/1.8, highly detailed skin texture, subsurface scattering",
    "\u6771\u4eac night city \u2b50 tab\tnew\r\nline \x07bell \u00bd \u2122",
]
SCORE_IMAGES = [(45, 70), (70, 31), (5, 3), (32, 32)]  # (H, W), scored with CAPTIONS[i]
PREPROCESS_IMAGES = [(97, 130, 64), (130, 97, 64), (20, 11, 64), (63, 40, 64), (1, 1, 32)]  # (H, W, size)


def image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth colours plus noise, so the resize has structure to get right and overshoot to keep."""
    y, x = np.mgrid[0:h, 0:w] / np.array([max(h - 1, 1), max(w - 1, 1)])[:, None, None]
    base = np.stack([x, y, 1 - x * y], -1) * 200 + rng.normal(0, 40, (h, w, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


def perturb(model: torch.nn.Module) -> None:
    """Weights at a working scale, norms and biases off their identity/zero init."""
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "embedding" in name:
                p.copy_(0.5 * noise)
            elif name in ("visual.proj", "text_projection"):  # used as x @ proj: fan-in is dim 0
                p.copy_(noise / p.shape[0] ** 0.5)
            elif p.ndim >= 2:
                p.copy_(noise / int(np.prod(p.shape[1:])) ** 0.5)
            else:  # biases, norm scales and shifts, logit_scale
                p.add_(0.1 * noise)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_known_args()  # `make reference-fixtures` passes every script the same options
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    out: dict[str, np.ndarray] = {}

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config_path = tmp / f"{TINY_NAME}.json"
        config_path.write_text(json.dumps({"embed_dim": EMBED_DIM, "vision_cfg": VISION_CFG, "text_cfg": TEXT_CFG}))
        hps_open_clip.add_model_config(config_path)

        # img_score builds ViT-H-14 with laion weights; build the toy with the same arguments instead.
        original = img_score.create_model_and_transforms
        calls = []

        def create_model_and_transforms(model_name, pretrained, **kwargs):
            calls.append((model_name, pretrained, kwargs))
            assert (model_name, pretrained) == ("ViT-H-14", "laion2B-s32B-b79K"), (model_name, pretrained)
            assert kwargs["light_augmentation"] and kwargs["output_dict"], kwargs
            torch.manual_seed(SEED)
            return original(TINY_NAME, None, **kwargs)

        img_score.create_model_and_transforms = create_model_and_transforms
        img_score.model_dict.clear()
        img_score.initialize_model()
        model = img_score.model_dict["model"]
        preprocess_val = img_score.model_dict["preprocess_val"]
        assert len(calls) == 1

        perturb(model)
        state = {key: value.detach().half() for key, value in model.state_dict().items()}  # as HPS ships
        path = OUT / "hps_tiny.pt"
        torch.save({"state_dict": state}, path)
        model.load_state_dict(state)  # the fp16-rounded weights, in fp32, as score() will have them
        model.eval()

        # Tokenisation: hpsv2's tokenizer and open-clip-torch's must agree.
        tokenizer = img_score.get_tokenizer("ViT-H-14")
        ids = tokenizer(CAPTIONS)
        assert torch.equal(ids, open_clip.get_tokenizer("ViT-H-14")(CAPTIONS)), "hpsv2 and open_clip tokenizers differ"
        out["captions"] = np.array(json.dumps(CAPTIONS))
        out["input_ids"] = ids.numpy().astype(np.int32)

        # Preprocessing: hpsv2's evaluation transform on PIL images of odd sizes.
        for i, (h, w, size) in enumerate(PREPROCESS_IMAGES):
            src = image(rng, h, w)
            transform = hps_open_clip.image_transform(size, is_train=False, resize_longest_max=True)
            out[f"pre_src_{i}"] = src
            out[f"pre_out_{i}"] = transform(Image.fromarray(src)).permute(1, 2, 0).numpy()

        # Features of fixed pixels and of every caption; both OpenCLIPs on the same weights.
        pixels = torch.from_numpy(rng.standard_normal((3, 3, 32, 32)).astype(np.float32))
        upstream = open_clip.model.CLIP(EMBED_DIM, VISION_CFG, TEXT_CFG).eval()
        upstream.load_state_dict(state)
        with torch.no_grad():
            image_features = model.encode_image(pixels)
            text_features = model.encode_text(ids)
            assert torch.allclose(upstream.encode_image(pixels), image_features, rtol=1e-5, atol=1e-6)
            assert torch.allclose(upstream.encode_text(ids), text_features, rtol=1e-5, atol=1e-6)
        out["pixel_values"] = pixels.permute(0, 2, 3, 1).numpy()  # NHWC, as ours takes them
        out["image_features"] = image_features.numpy()
        out["text_features"] = text_features.numpy()

        # HPS itself: img_score.score(PIL image, caption, checkpoint) per pair.
        srcs = [image(rng, h, w) for h, w in SCORE_IMAGES]
        scores = []
        for i, src in enumerate(srcs):
            out[f"score_src_{i}"] = src
            scores.append(img_score.score(Image.fromarray(src), CAPTIONS[i], cp=str(path))[0])
        out["scores"] = np.asarray(scores, np.float32)
        with torch.no_grad():  # the same from the parts, which the tests compare one by one
            score_pixels = torch.stack([preprocess_val(Image.fromarray(src)) for src in srcs])
            score_image = F.normalize(model.encode_image(score_pixels), dim=-1)
            score_text = F.normalize(model.encode_text(ids[:len(srcs)]), dim=-1)
        np.testing.assert_allclose((score_image * score_text).sum(-1).numpy(), out["scores"], rtol=1e-5, atol=1e-6)
        out["score_pixel_values"] = score_pixels.permute(0, 2, 3, 1).numpy()
        out["state_dict_keys"] = np.array(json.dumps(sorted(state)))

    # The real architecture's tensor shapes (no weights: the meta device), for the converter's
    # config inference and the parameter count. hpsv2's CLIP is what loads the HPS checkpoints.
    with torch.device("meta"):
        vit_h = hps_open_clip.model.CLIP(**hps_open_clip.get_model_config("ViT-H-14"), output_dict=True)
        upstream_h = open_clip.model.CLIP(**open_clip.get_model_config("ViT-H-14"))
    shapes = {key: list(value.shape) for key, value in vit_h.state_dict().items()}
    assert shapes == {key: list(value.shape) for key, value in upstream_h.state_dict().items()}
    out["vit_h_14_shapes"] = np.array(json.dumps(shapes))
    out["vit_h_14_params"] = np.array(sum(p.numel() for p in vit_h.parameters()), np.int64)
    np.savez_compressed(OUT / "outputs.npz", **out)
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"wrote {OUT} ({total / 1e6:.2f} MB); scores {out['scores']}; ViT-H-14 {int(out['vit_h_14_params'])} params")


if __name__ == "__main__":
    main()
