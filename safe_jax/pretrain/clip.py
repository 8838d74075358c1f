"""The world's CLIPs: our Flax ``CLIPModel`` trained contrastively from scratch, exported as a
transformers folder with its tokenizer.

Two are trained, by the same code at two sizes and seeds: the *reward* CLIP, whose text tower is
also the diffusion model's text encoder (so the DFE reward and the UNet read one tokenizer), and
the *judge*, used only to evaluate (subject recall), which must not be the model that was
optimised against.

Loss: InfoNCE both ways with a learnable temperature (CLIP's, clamped at 100), with soft targets:
a text's positives are every picture of the batch it describes. Most texts are captions (their
own picture only); a share ``subject_prompt_rate`` are "a photo of {subject}" for one of the
picture's subjects — the prompt the judge is asked in ``safe_jax.eval.subject_recall`` — and
every picture of the batch showing that subject is a positive for it.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from safe_jax.eval.subject_recall import TEMPLATE
from safe_jax.io.clip_folder import init_params, save_clip
from safe_jax.models.clip_text import CLIPTextConfig
from safe_jax.models.clip_vision import CLIPConfig, CLIPModel, CLIPVisionConfig, l2_normalise
from safe_jax.pretrain import data
from safe_jax.pretrain.vocab import build_world_tokenizer, text_config_ids
from safe_jax.text import tokenizer as tok
from safe_jax.train.rewards import CLIP_MEAN, CLIP_STD

MAX_LOGIT_SCALE = math.log(100.0)


def clip_config(config: Any, ids: dict[str, int]) -> CLIPConfig:
    m = config.model
    text = CLIPTextConfig(hidden_size=m.text.hidden_size, intermediate_size=m.text.mlp_size,
                          num_hidden_layers=m.text.layers, num_attention_heads=m.text.heads,
                          max_position_embeddings=m.max_length, projection_dim=m.projection_dim, **ids)
    vision = CLIPVisionConfig(hidden_size=m.vision.hidden_size, intermediate_size=m.vision.mlp_size,
                              num_hidden_layers=m.vision.layers, num_attention_heads=m.vision.heads,
                              image_size=config.data.image_size, patch_size=m.vision.patch_size)
    return CLIPConfig(text=text, vision=vision, projection_dim=m.projection_dim)


def vocabulary_texts(world: data.World, seed: int, n: int) -> list[str]:
    """What the tokenizer must split as CLIP does: ``n`` training captions and their subject prompts."""
    examples = [data.training_example(world, seed, i) for i in range(n)]
    return [e.caption for e in examples] + sorted({TEMPLATE.format(s.text) for e in examples for s in e.subjects})


def pixels(images_uint8: jax.Array) -> jax.Array:
    """uint8 [B, S, S, 3] → CLIP-normalised float32, as the processor does at the model's own size."""
    x = images_uint8.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


class CLIPTask:
    curves = ("loss", "accuracy", "logit_scale", "eval_caption_top1", "eval_subject_top1")

    def __init__(self, config: Any):
        self.config = config
        self.world = data.world(config.data.image_size)
        self.tokenizer = build_world_tokenizer(vocabulary_texts(self.world, config.data.seed, config.vocab_examples),
                                               Path(config.workdir) / "tokenizer")
        self.tokenizer.model_max_length = config.model.max_length
        self.model = CLIPModel(clip_config(config, text_config_ids(self.tokenizer)))
        self._held_out = None

    def init(self, seed: int) -> tuple[Any, dict]:
        return init_params(self.model, seed), {}  # not init_for_training: the CLS token must see the patches

    def tokenize(self, texts: list[str]) -> np.ndarray:
        return tok.tokenize(self.tokenizer, texts, self.config.model.max_length)

    def assemble(self, examples: list[data.Example], rng: np.random.Generator) -> dict:
        """Pictures, one text each (caption or subject prompt) and the [text, picture] positives."""
        texts, shows = [], []
        for e in examples:
            if e.subjects and rng.random() < self.config.loss.subject_prompt_rate:
                s = e.subjects[int(rng.integers(len(e.subjects)))]
                texts.append(TEMPLATE.format(s.text))
                shows.append(lambda other, sig=s.signature: sig in {t.signature for t in other.subjects})
            else:
                texts.append(e.caption)
                shows.append(lambda other, caption=e.caption: other.caption == caption)
        positives = np.array([[show(other) for other in examples] for show in shows], np.float32)
        return {"images": data.images_uint8(examples), "input_ids": self.tokenize(texts), "positives": positives}

    def batches(self) -> data.StepBatches:
        d = self.config.data
        return data.StepBatches(self.world, d.seed, d.batch_size, self.assemble, d.prefetch)

    def loss(self, params: Any, frozen: dict, batch: dict, key: jax.Array):
        apply = lambda method, x: self.model.apply({"params": params}, x, method=method)
        image = l2_normalise(apply(CLIPModel.get_image_features, pixels(batch["images"])))
        text = l2_normalise(apply(CLIPModel.get_text_features, batch["input_ids"]))
        scale = jnp.exp(jnp.minimum(params["logit_scale"], MAX_LOGIT_SCALE))
        logits = scale * text @ image.T  # [text, picture]
        pos = batch["positives"]
        t2i = -jnp.sum(pos / pos.sum(1, keepdims=True) * jax.nn.log_softmax(logits, 1), 1)
        i2t = -jnp.sum(pos.T / pos.T.sum(1, keepdims=True) * jax.nn.log_softmax(logits.T, 1), 1)
        loss = (jnp.mean(t2i) + jnp.mean(i2t)) / 2
        accuracy = jnp.mean(jnp.take_along_axis(pos, jnp.argmax(logits, 1)[:, None], 1))
        return loss, {"accuracy": accuracy, "logit_scale": scale}

    def make_step(self, tx, ema_decay):
        from safe_jax.pretrain.loop import make_step

        return make_step(self.loss, tx, ema_decay)

    # ------------------------------------------------------------------ held-out
    def held_out(self) -> list[data.Example]:
        if self._held_out is None:
            self._held_out = data.held_out(self.world, self.config.eval_examples)
        return self._held_out

    def text_embeds(self, params: Any, texts: list[str]) -> np.ndarray:
        """Normalised text embeddings, in batches of ``eval_examples`` (one compiled shape)."""
        n = self.config.eval_examples
        out = []
        for i in range(0, len(texts), n):
            chunk = texts[i:i + n]
            ids = self.tokenize(chunk + [""] * (n - len(chunk)))
            out.append(np.asarray(_text_embeds(self.model, params, jnp.asarray(ids)))[:len(chunk)])
        return np.concatenate(out)

    def evaluate(self, params: Any, frozen: dict) -> dict[str, float]:
        """Caption retrieval (top-1 both ways among the held-out pictures) and subject recall@1:
        each subject's prompt ranked against the prompts of every other subject of its kind."""
        examples = self.held_out()
        images = np.asarray(_image_embeds(self.model, params, jnp.asarray(data.images_uint8(examples))))
        captions = self.text_embeds(params, [e.caption for e in examples])
        sims = captions @ images.T
        truth = np.arange(len(examples))
        out = {"caption_top1": float(np.mean(sims.argmax(1) == truth)),
               "image_top1": float(np.mean(sims.argmax(0) == truth))}
        named: dict[str, dict[str, str]] = {}  # kind -> signature -> the first text naming it
        for e in examples:
            for s in e.subjects:
                named.setdefault(s.kind, {}).setdefault(s.signature, s.text)
        hits: dict[str, list[float]] = {}
        for kind, by_signature in named.items():
            signatures = list(by_signature)
            prompts = self.text_embeds(params, [TEMPLATE.format(by_signature[sig]) for sig in signatures])
            scores = images @ prompts.T  # [picture, subject of this kind]
            for i, e in enumerate(examples):
                for s in (s for s in e.subjects if s.kind == kind):
                    j = signatures.index(s.signature)
                    hits.setdefault(kind, []).append(float(np.sum(scores[i] >= scores[i, j]) == 1))
        every = [h for v in hits.values() for h in v]
        out["subject_top1"] = float(np.mean(every)) if every else float("nan")
        out.update({f"subject_top1.{kind}": float(np.mean(v)) for kind, v in sorted(hits.items())})
        return out

    def samples(self, params: Any, frozen: dict) -> None:
        return None

    def export(self, params: Any, frozen: dict, out_dir: Path) -> dict:
        params = {**params, "logit_scale": np.minimum(params["logit_scale"], np.float32(MAX_LOGIT_SCALE))}
        save_clip(self.model, params, out_dir, dtype=self.config.export.dtype)
        tok.save_tokenizer(self.tokenizer, out_dir)
        return {"vocab_size": len(self.tokenizer), **self.evaluate(params, frozen)}


@functools.partial(jax.jit, static_argnums=0)
def _image_embeds(model: CLIPModel, params: Any, images_uint8: jax.Array) -> jax.Array:
    return l2_normalise(model.apply({"params": params}, pixels(images_uint8), method=CLIPModel.get_image_features))


@functools.partial(jax.jit, static_argnums=0)
def _text_embeds(model: CLIPModel, params: Any, ids: jax.Array) -> jax.Array:
    return l2_normalise(model.apply({"params": params}, ids, method=CLIPModel.get_text_features))
