"""safe-jax generate: prompts -> PNG files, each carrying its generation settings in its metadata."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from launch.errors import one_line_errors


def parse_args(argv: list[str], prog: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__)
    p.add_argument("--model", default="tiny", help="a local diffusers folder, or a preset: tiny, sd15, sd21, sd21-base")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several images")
    p.add_argument("--negative-prompt", default="", help="one negative prompt for all images")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scheduler", default="ddim", choices=("ddim", "euler_a", "dpm++2m"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4, help="prompts per compiled call")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="compute dtype (default: bf16 on GPU/TPU)")
    p.add_argument("--out", type=Path, default=Path("out/generate"))
    return p.parse_args(argv)


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n] or "image"


def main(argv: list[str] | None = None, prog: str = "safe-jax generate") -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv, prog)

    @one_line_errors(prog)
    def run() -> int:
        import jax.numpy as jnp
        from PIL import Image, PngImagePlugin
        from tqdm import tqdm

        from safe_jax.pipeline import StableDiffusion

        t0 = time.perf_counter()
        dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, None: None}[args.dtype]
        pipe, params = StableDiffusion.from_pretrained(args.model, dtype=dtype, seed=args.seed)
        print(f"loaded {args.model} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        args.out.mkdir(parents=True, exist_ok=True)
        prompts = args.prompt
        with tqdm(total=len(prompts), desc="generating", unit="img") as bar:
            for start in range(0, len(prompts), args.batch_size):
                chunk = prompts[start:start + args.batch_size]
                seed = args.seed + start
                images = pipe.generate(params, chunk, negative_prompts=args.negative_prompt, num_steps=args.steps,
                                       guidance_scale=args.guidance, scheduler=args.scheduler, seed=seed,
                                       height=args.height, width=args.width)
                for j, (prompt, image) in enumerate(zip(chunk, images)):
                    settings = {"prompt": prompt, "negative_prompt": args.negative_prompt, "model": str(args.model),
                                "steps": args.steps, "guidance_scale": args.guidance, "scheduler": args.scheduler,
                                "seed": seed, "batch_index": j, "height": int(image.shape[0]),
                                "width": int(image.shape[1]), "dtype": args.dtype or "default"}
                    info = PngImagePlugin.PngInfo()
                    info.add_text("parameters", json.dumps(settings))
                    info.add_text("Software", "safe-jax")
                    path = args.out / f"{start + j:04d}-{_slug(prompt)}.png"
                    Image.fromarray(image).save(path, pnginfo=info)
                bar.update(len(chunk))
        print(f"wrote {len(prompts)} images to {args.out} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        return 0

    return run()


if __name__ == "__main__":
    sys.exit(main())
