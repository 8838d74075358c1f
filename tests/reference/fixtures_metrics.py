"""Reference fixtures for the evaluation metrics, written by the metrics' own code.

Run with the reference environment only (``make reference-fixtures``); the project's tests read
what this writes and never import the reference. Nothing is downloaded, everything is seeded.
Writes tests/fixtures/reference/metrics/:

- frechet.npz: clean-fid's ``frechet_distance`` (cleanfid/fid.py) on seeded feature sets, the
  means and covariances taken with the numpy calls clean-fid's ``fid.py`` makes
  (``np.mean(axis=0)``, ``np.cov(rowvar=False)``). Cases: a regular one, rank-deficient
  covariances (sqrtm returns a complex matrix), a product with a Jordan block (sqrtm is not
  finite: the eps offset branch), float32 features, and a non-PSD covariance (the reference's
  "Imaginary component" ValueError, recorded as its message).
- preprocess_cleanfid.npz: clean-fid's own ``img_preprocess_clip`` (cleanfid/clip_features.py,
  the ``clip_vit_b_32`` mode's resize) on seeded uint8 images of odd sizes.
- preprocess_hf.npz: transformers' ``CLIPImageProcessor`` (shortest edge 64, centre crop 64) on
  seeded uint8 images given as CHW torch tensors, as torchmetrics passes them.
- clip_tiny/: a random transformers ``CLIPModel`` (toy widths, 32-pixel images) with a
  ``CLIPTokenizer`` on a small vocabulary (CLIP's 512 byte tokens, the first merges of CLIP's
  ``bpe_simple_vocab_16e6.txt.gz`` from open-clip-torch's package data, the two special tokens)
  and its ``CLIPImageProcessor``; clipscore.npz: torchmetrics' ``CLIPScore`` on it (what the
  model was fed, the per-sample scores of ``_clip_score_update``, the metric's ``compute()``)
  and PickScore's recipe (processor with ``padding=True, truncation=True, max_length=77``,
  ``logit_scale.exp() * cos``).
- cmmd.npz (with ``--cmmd-src``): google-research/cmmd's ``distance.mmd`` on seeded embeddings,
  as it runs (float32) and with ``jax_enable_x64`` on float64 inputs; its ``io_util``
  ``_center_crop_and_resize`` on seeded images; with ``--scenic-src`` also ``embedding``'s
  ``_clip_preprocess`` (``jax.image.resize`` + scenic's ``normalize_image``) after io_util's
  ``/ 255.0``. The two files import TensorFlow and scenic, which the reference environment does
  not hold, so those functions are taken from the files' own source (``ast``) and run as written.
- meta.json: the versions that produced them.

The seeded images are ``np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)``;
only their recipe and sha256 are stored (the tests regenerate them), except the tiny CLIPScore ones.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "reference" / "metrics"

# (seed, height, width): portrait, landscape whose crop offset (383 - 224) / 2 = 79.5 rounds to 80
# in torchvision and floors to 79 in transformers, smaller than 224 (upscaled).
CLEANFID_IMAGES = [(11, 260, 231), (12, 227, 389), (13, 97, 150)]
# At 64: portrait, landscape 90x134 -> 64x95 (offset 15.5: round 16, floor 15), small, square.
HF_IMAGES = [(21, 150, 100), (22, 90, 134), (23, 40, 50), (24, 64, 64)]
HF_SIZE = 64
# CLIPScore on the tiny model (32 pixels): 33x70 -> 32x67 (offset 17.5: round 18, floor 17).
SCORE_IMAGES = [(31, 45, 37), (32, 32, 32), (33, 20, 50), (34, 33, 70)]
CAPTIONS = [
    "a red cat sitting on a mat",
    "A photo of an astronaut riding a horse!",
    "portrait of a woman, highly detailed",
    # More than 77 tokens: torchmetrics cuts the ids after tokenising, which drops the EOS token.
    "a very long caption about a city at night with many lights and people walking along the river "
    "under a cloudy sky while a dog runs after a red ball near the old stone bridge, and far away "
    "a train crosses the valley between two green hills covered in snow",
]
# CMMD's io_util crop + resize, at a small size (the function takes the size; the model uses 336).
CMMD_IMAGES = [(41, 131, 97), (42, 83, 150), (43, 40, 45), (44, 200, 260)]
CMMD_SIZE = 96
NUM_MERGES = 300


def seeded_image(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def image_input(out: dict, key: str, seed: int, height: int, width: int) -> np.ndarray:
    """The seeded image, recorded by its recipe and hash (the tests regenerate it)."""
    image = seeded_image(seed, height, width)
    out[f"{key}/spec"] = np.array([seed, height, width])
    out[f"{key}/input_sha256"] = np.array(sha256(image))
    return image


# ---------------------------------------------------------------------------------------------
# (a) Fréchet distance
# ---------------------------------------------------------------------------------------------

def frechet_fixtures() -> dict[str, np.ndarray]:
    from cleanfid.fid import frechet_distance

    out: dict[str, np.ndarray] = {}

    def features_case(name: str, f1: np.ndarray, f2: np.ndarray) -> None:
        mu1, sigma1 = np.mean(f1, axis=0), np.cov(f1, rowvar=False)  # as cleanfid/fid.py
        mu2, sigma2 = np.mean(f2, axis=0), np.cov(f2, rowvar=False)
        out.update({f"{name}/f1": f1, f"{name}/f2": f2, f"{name}/mu1": mu1, f"{name}/sigma1": sigma1,
                    f"{name}/mu2": mu2, f"{name}/sigma2": sigma2,
                    f"{name}/fd": np.float64(frechet_distance(mu1, sigma1, mu2, sigma2))})

    rng = np.random.default_rng(100)
    d = 16
    a1, a2 = rng.standard_normal((d, d)) / 4, rng.standard_normal((d, d)) / 4
    features_case("regular", rng.standard_normal((200, d)) @ a1 + 0.5,
                  rng.standard_normal((150, d)) @ a2 - 0.25)
    rng = np.random.default_rng(0)  # n < D: singular covariances, sqrtm comes back complex
    features_case("rank_deficient", rng.standard_normal((10, d)), rng.standard_normal((10, d)) * 2 + 1)
    rng = np.random.default_rng(101)
    features_case("float32", (rng.standard_normal((120, d)) * 3 + 7).astype(np.float32),
                  (rng.standard_normal((130, d)) * 2 + 7.5).astype(np.float32))

    # sigma1 · sigma2 holds a Jordan block: sqrtm is not finite, clean-fid adds eps to the diagonals.
    sigma1 = np.diag([0.0, 0.0, 1.0, 2.0])
    sigma1[0, 1] = 1.0
    sigma2 = np.eye(4)
    mu1, mu2 = np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.0, -0.1, 0.5, 0.2])
    out.update({"offset/mu1": mu1, "offset/sigma1": sigma1, "offset/mu2": mu2, "offset/sigma2": sigma2,
                "offset/fd": np.float64(frechet_distance(mu1, sigma1, mu2, sigma2))})

    # Not PSD: the square root has an imaginary diagonal; clean-fid 0.1.35 raises.
    sigma2 = np.diag([-1.0, 1.0, 1.0, 1.0])
    try:
        frechet_distance(mu1, np.eye(4), mu2, sigma2)
        message = ""
    except ValueError as e:
        message = str(e)
    out.update({"imaginary/mu1": mu1, "imaginary/sigma1": np.eye(4), "imaginary/mu2": mu2,
                "imaginary/sigma2": sigma2, "imaginary/error": np.array(message)})
    return out


# ---------------------------------------------------------------------------------------------
# (b) image preprocessing
# ---------------------------------------------------------------------------------------------

def cleanfid_preprocess_fixtures() -> dict[str, np.ndarray]:
    # The module imports OpenAI's ``clip`` package at the top; the function does not use it, so a
    # stand-in keeps the import offline where the package is absent.
    if importlib.util.find_spec("clip") is None:
        sys.modules["clip"] = types.ModuleType("clip")
    from cleanfid.clip_features import img_preprocess_clip

    out: dict[str, np.ndarray] = {}
    for i, (seed, h, w) in enumerate(CLEANFID_IMAGES):
        out[f"{i}/output"] = img_preprocess_clip(image_input(out, str(i), seed, h, w))
    return out


def hf_preprocess_fixtures() -> dict[str, np.ndarray]:
    import torch
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": HF_SIZE}, crop_size={"height": HF_SIZE, "width": HF_SIZE})
    out: dict[str, np.ndarray] = {}
    for i, (seed, h, w) in enumerate(HF_IMAGES):
        image = image_input(out, str(i), seed, h, w)
        tensor = torch.from_numpy(image).permute(2, 0, 1)  # torchmetrics' [C, H, W] uint8 tensors
        if i < 2:
            out[f"{i}/pixel_values"] = processor(images=[tensor], return_tensors="np")["pixel_values"][0]
        # The same without rescale / normalise: the uint8 pixels after resize + crop.
        raw = processor(images=[tensor], do_rescale=False, do_normalize=False, return_tensors="np")
        out[f"{i}/pixels"] = np.asarray(raw["pixel_values"][0]).transpose(1, 2, 0).astype(np.uint8)
    return out


# ---------------------------------------------------------------------------------------------
# (c) torchmetrics' CLIPScore and PickScore's recipe on a tiny random CLIP
# ---------------------------------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's byte -> printable character table (simple_tokenizer.bytes_to_unicode)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_tokenizer_files(folder: Path) -> int:
    """vocab.json + merges.txt laid out as CLIP's: bytes, bytes</w>, merges, the two specials."""
    spec = importlib.util.find_spec("open_clip")
    bpe = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1:1 + NUM_MERGES]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(set(vocab)) == len(vocab)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
                                       encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return len(vocab)


def clipscore_fixtures(folder: Path) -> dict[str, np.ndarray]:
    import torch
    from PIL import Image
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update
    from torchmetrics.functional.multimodal.clip_score import clip_score as tm_clip_score
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    vocab_size = write_tokenizer_files(folder)
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))  # openai's specials
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(folder))

    # eos_token_id 2: the legacy value of the openai/clip-* configs (pool at the largest id = EOS).
    text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8)
    torch.manual_seed(0)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    CLIPModel(config).eval().save_pretrained(str(folder), safe_serialization=True)
    for path in folder.iterdir():
        path.chmod(0o644)  # safetensors writes its file owner-only

    def load():
        return CLIPModel.from_pretrained(str(folder)).eval(), CLIPProcessor.from_pretrained(str(folder))

    images = [seeded_image(seed, h, w) for seed, h, w in SCORE_IMAGES]
    tensors = [torch.from_numpy(image).permute(2, 0, 1) for image in images]
    out: dict[str, np.ndarray] = {f"image{i}": image for i, image in enumerate(images)}
    out["captions"] = np.array(CAPTIONS)

    # What torchmetrics feeds the model, recorded on the way in and out.
    model, processor = load()
    seen: dict[str, np.ndarray] = {}
    get_image, get_text = model.get_image_features, model.get_text_features

    def image_features(pixel_values, *args, **kwargs):
        result = get_image(pixel_values, *args, **kwargs)
        seen.update(pixel_values=pixel_values.numpy(), image_features=result.detach().numpy())
        return result

    def text_features(input_ids, attention_mask=None, *args, **kwargs):
        result = get_text(input_ids, attention_mask, *args, **kwargs)
        seen.update(input_ids=input_ids.numpy(), attention_mask=attention_mask.numpy(),
                    text_features=result.detach().numpy())
        return result

    model.get_image_features, model.get_text_features = image_features, text_features
    with torch.no_grad():
        per_sample, _ = _clip_score_update(tensors, CAPTIONS, model, processor)
    out.update({f"torchmetrics/{k}": v for k, v in seen.items()})
    out["torchmetrics/per_sample"] = per_sample.detach().numpy()

    metric = CLIPScore(model_name_or_path=load)
    with torch.no_grad():
        metric.update(tensors[:2], CAPTIONS[:2])
        metric.update(tensors[2:], CAPTIONS[2:])
        out["torchmetrics/compute"] = metric.compute().detach().numpy()
        negative = CLIPScore(model_name_or_path=load)  # a negative mean: the metric clamps it to 0
        negative.update(tensors[2:3], CAPTIONS[2:3])
        out["torchmetrics/compute_negative"] = negative.compute().detach().numpy()
        out["torchmetrics/functional"] = tm_clip_score(tensors, CAPTIONS, load).detach().numpy()

    # PickScore's published recipe (its README), on PIL images.
    model, processor = load()
    with torch.no_grad():
        pil = [Image.fromarray(image) for image in images]
        image_inputs = processor(images=pil, padding=True, truncation=True, max_length=77, return_tensors="pt")
        text_inputs = processor(text=CAPTIONS, padding=True, truncation=True, max_length=77, return_tensors="pt")
        image_embs = model.get_image_features(**image_inputs)
        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
        text_embs = model.get_text_features(**text_inputs)
        text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
        scores = model.logit_scale.exp() * (text_embs @ image_embs.T)
    out["pickscore/input_ids"] = text_inputs["input_ids"].numpy()
    out["pickscore/pixel_values"] = image_inputs["pixel_values"].numpy()
    out["pickscore/scores"] = scores.numpy()  # [caption, image]
    return out


# ---------------------------------------------------------------------------------------------
# (d) CMMD
# ---------------------------------------------------------------------------------------------

def _source_functions(path: Path, names: set[str], namespace: dict) -> dict:
    """Run the top-level functions and assignments ``names`` of the file at ``path`` as written."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    body = [node for node in tree.body
            if (isinstance(node, ast.FunctionDef) and node.name in names)
            or (isinstance(node, ast.Assign) and any(getattr(t, "id", None) in names for t in node.targets))]
    missing = names - {getattr(n, "name", None) for n in body} - {t.id for n in body if isinstance(n, ast.Assign)
                                                                 for t in n.targets}
    if missing:
        raise SystemExit(f"{path} has no {', '.join(sorted(missing))}")
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


def _embeddings(rng: np.random.Generator, n: int, d: int, shift: float) -> np.ndarray:
    x = rng.standard_normal((n, d)) + shift * np.linspace(1.0, -1.0, d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def cmmd_fixtures(cmmd_src: Path, scenic_src: Path | None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    import jax
    import jax.numpy as jnp
    from PIL import Image

    cmmd_dir = cmmd_src / "cmmd" if (cmmd_src / "cmmd" / "distance.py").is_file() else cmmd_src
    files = {name: cmmd_dir / name for name in ("distance.py", "io_util.py", "embedding.py")}
    for path in files.values():
        if not path.is_file():
            raise SystemExit(f"--cmmd-src: {path} does not exist")
    hashes = {f"cmmd/{name}": hashlib.sha256(path.read_bytes()).hexdigest() for name, path in files.items()}
    spec = importlib.util.spec_from_file_location("cmmd_distance", files["distance.py"])
    distance = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(distance)

    out: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(200)
    cases = {
        "shifted": (_embeddings(rng, 48, 32, 0.0), _embeddings(rng, 40, 32, 0.6)),
        "same_distribution": (_embeddings(rng, 64, 32, 0.0), _embeddings(rng, 64, 32, 0.0)),
        "wide": (_embeddings(rng, 48, 256, 0.0), _embeddings(rng, 48, 256, 1.0)),
    }
    assert not jax.config.jax_enable_x64
    for name, (x, y) in cases.items():
        out[f"{name}/x"], out[f"{name}/y"] = x, y
        out[f"{name}/mmd_float32"] = np.asarray(distance.mmd(x, y))
    jax.config.update("jax_enable_x64", True)
    for name, (x, y) in cases.items():
        value = distance.mmd(x.astype(np.float64), y.astype(np.float64))
        assert value.dtype == jnp.float64
        out[f"{name}/mmd_float64"] = np.asarray(value)
    jax.config.update("jax_enable_x64", False)

    io_util = _source_functions(files["io_util.py"], {"_center_crop_and_resize"}, {"Image": Image})
    clip = None
    if scenic_src is not None:
        model_py = scenic_src / "scenic" / "projects" / "baselines" / "clip" / "model.py"
        if not model_py.is_file():
            raise SystemExit(f"--scenic-src: {model_py} does not exist")
        hashes["scenic/clip/model.py"] = hashlib.sha256(model_py.read_bytes()).hexdigest()
        clip = types.SimpleNamespace(**{
            k: v for k, v in _source_functions(
                model_py, {"IMAGE_MEAN", "IMAGE_STD", "normalize_image"}, {"np": np, "jnp": jnp}).items()
            if not k.startswith("__")})
    embedding = _source_functions(files["embedding.py"], {"_clip_preprocess"}, {"jax": jax, "clip": clip})
    for i, (seed, h, w) in enumerate(CMMD_IMAGES):
        image = image_input(out, f"image{i}", seed, h, w)
        resized = io_util["_center_crop_and_resize"](Image.fromarray(image), CMMD_SIZE)
        out[f"image{i}/resized"] = np.asarray(resized)
        if clip is not None and i == 0:
            batch = np.asarray(resized).astype(np.float32)[None] / 255.0  # io_util: _read_image, then / 255.0
            out[f"image{i}/pixels"] = np.asarray(embedding["_clip_preprocess"](batch, CMMD_SIZE))[0]
    return out, hashes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--cmmd-src", type=Path, default=None,
                        help="a checkout of google-research/google-research's cmmd/ (or the folder above it)")
    parser.add_argument("--scenic-src", type=Path, default=None,
                        help="a checkout of google-research/scenic, for CMMD's normalize_image")
    args = parser.parse_args()
    import cleanfid
    import PIL
    import scipy
    import torch
    import torchmetrics
    import transformers

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"numpy": np.__version__, "scipy": scipy.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "torchmetrics": torchmetrics.__version__,
            "clean-fid": getattr(cleanfid, "__version__", "0.1.35"), "pillow": PIL.__version__}
    np.savez_compressed(args.out / "frechet.npz", **frechet_fixtures())
    np.savez_compressed(args.out / "preprocess_cleanfid.npz", **cleanfid_preprocess_fixtures())
    np.savez_compressed(args.out / "preprocess_hf.npz", **hf_preprocess_fixtures())
    np.savez_compressed(args.out / "clipscore.npz", **clipscore_fixtures(args.out / "clip_tiny"))
    if args.cmmd_src is None:
        print("fixtures_metrics: no --cmmd-src given, cmmd.npz left as it is "
              "(google-research/google-research's cmmd/ is not on PyPI)")
        old = args.out / "meta.json"
        if old.is_file():  # the kept cmmd.npz's provenance
            previous = json.loads(old.read_text())
            meta.update({k: v for k, v in previous.items() if k == "jax" or k.startswith(("cmmd/", "scenic/"))})
    else:
        import jax

        cmmd, hashes = cmmd_fixtures(args.cmmd_src, args.scenic_src)
        if args.scenic_src is None:
            print("fixtures_metrics: no --scenic-src given, CMMD's normalised pixels left out of cmmd.npz")
        np.savez_compressed(args.out / "cmmd.npz", **cmmd)
        meta.update(jax=jax.__version__, **hashes)
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    print(f"fixtures_metrics: wrote {args.out}")


if __name__ == "__main__":
    main()
