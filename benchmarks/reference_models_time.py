"""The PyTorch side of benchmarks/eval_throughput.py for the models only the reference environment has.

Run by eval_throughput.py with the reference environment's Python (open_clip and ImageReward need
torchvision): builds the real architecture with random weights, times one forward of a batch
(the metric's whole score: both towers and the head) with the same protocol (one warm-up call,
median over rounds), prints {"median_s": ...} as its last line.

    .refenv/bin/python benchmarks/reference_models_time.py hps --batch 8 --rounds 5
    .refenv/bin/python benchmarks/reference_models_time.py imagereward --batch 8 --rounds 5
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

import torch

# BLIP's MED text encoder as ImageReward's med_config.json describes it (BERT-base + cross-attention).
MED_CONFIG = {
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30524,
    "encoder_width": 1024, "add_cross_attention": True,
}


def median_time(fn, rounds: int) -> float:
    with torch.no_grad():
        fn()
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def hps(batch: int, rounds: int) -> float:
    import open_clip

    model = open_clip.create_model("ViT-H-14", pretrained=None).eval()
    pixels = torch.randn(batch, 3, 224, 224)
    ids = open_clip.get_tokenizer("ViT-H-14")(["a photo of a cat"] * batch)

    def score():
        image = model.encode_image(pixels)
        text = model.encode_text(ids)
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        return (image * text).sum(-1)

    return median_time(score, rounds)


def imagereward(batch: int, rounds: int) -> float:
    from ImageReward.models.BLIP import blip as blip_module
    from transformers import BertTokenizer

    ir_module = importlib.import_module("ImageReward.ImageReward")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        # A WordPiece vocabulary of the real size (only the tokenizer's construction needs it).
        words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase]
        words += [f"w{i}" for i in range(30522 - len(words))]
        (folder / "vocab.txt").write_text("\n".join(words) + "\n")
        (folder / "med_config.json").write_text(json.dumps(MED_CONFIG))

        class LocalBertTokenizer(BertTokenizer):
            @classmethod
            def from_pretrained(cls, name, *args, **kwargs):
                return BertTokenizer.from_pretrained(str(folder), *args, **kwargs)

        blip_module.BertTokenizer = LocalBertTokenizer
        model = ir_module.ImageReward(med_config=str(folder / "med_config.json"), device="cpu").eval()
    pixels = torch.randn(batch, 3, 224, 224)
    ids = torch.randint(1000, 30000, (batch, 35))
    mask = torch.ones_like(ids)
    return median_time(lambda: model.score_gard(ids, mask, pixels), rounds)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", choices=("hps", "imagereward"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    seconds = {"hps": hps, "imagereward": imagereward}[args.model](args.batch, args.rounds)
    print(json.dumps({"model": args.model, "median_s": seconds, "torch": torch.__version__,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    sys.exit(main())
