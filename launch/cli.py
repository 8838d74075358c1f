"""``safe-jax``: one console script, one subcommand per module in ``launch``."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": "SAFE end to end on anchor/sample: subjects, fine-tune tiny, export, grids, report.",
    "generate": "Generate images from prompts with a local checkpoint or preset.",
    "eval": "Draw images for prompts with one or more models and score them (FID_CLIP, CLIPScore, HPS, ...).",
    "export": "Write a model as a diffusers folder (safetensors, fp32 or fp16).",
    "subjects": "Find the key visual subjects of news captions (LLM or offline) as JSONL.",
    "train": "SAFE domain fine-tuning (denoising + ReFL) from a config; resumes, checkpoints, exports.",
    "pretrain": "Train the synthetic world's VAE, CLIPs and UNet from scratch (launch/configs/world_*.py).",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        print("usage: safe-jax <command> [options]\n\ncommands:")
        for name, text in COMMANDS.items():
            print(f"  {name:<{width}}  {text}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nsafe-jax: error: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(f"launch.{argv[0]}")
    return module.main(argv[1:], prog=f"safe-jax {argv[0]}")


if __name__ == "__main__":
    sys.exit(main())
