"""safe-jax generate: prompts -> PNG files, each carrying its generation settings in its metadata."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

from safe_jax.sampling import SAMPLERS
from launch.cli_errors import ArgumentParser, float_in, int_at_least, multiple_of, one_line_errors, output_dir

MAX_SEED = 2 ** 32 - 1


def parse_args(argv: list[str], prog: str) -> argparse.Namespace:
    p = ArgumentParser(prog=prog, description=__doc__)
    p.add_argument("--model", default="tiny", help="a local diffusers folder (SD 1.x/2.x or XL), or a preset: tiny, "
                                                   "sd15, sd21, sd21-base, tiny-xl, sdxl, tiny-anchor")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several images")
    p.add_argument("--negative-prompt", default=None,
                   help="one negative prompt for all images (default: none, which SDXL encodes as zeros)")
    p.add_argument("--steps", type=int_at_least(1), default=50)
    p.add_argument("--guidance", type=float_in(0.0), default=7.5, help="classifier-free guidance scale (≤ 1: none)")
    p.add_argument("--scheduler", default=None, choices=SAMPLERS,
                   help="default: the sampler of the folder's scheduler class (Euler for SDXL), else ddim")
    p.add_argument("--seed", type=int_at_least(0), default=0,
                   help="image i (0, 1, … in prompt order) uses seed + i, written in its PNG; the same prompt "
                        "with that seed alone draws it again, whatever the batch size")
    p.add_argument("--height", type=multiple_of(8), default=None, help="pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--width", type=multiple_of(8), default=None, help="pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--batch-size", type=int_at_least(1), default=4, help="prompts per compiled call")
    p.add_argument("--init-seed", type=int_at_least(0), default=0,
                   help="the random weights of a preset (tiny, sd15, ...); unused for a folder")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="compute dtype (default: bf16 on GPU/TPU)")
    p.add_argument("--out", type=output_dir, default="out/generate", help="a directory (created if needed)")
    s = p.add_argument_group("subject conditioning (SAFE)")
    s.add_argument("--subjects", action="append", default=None,
                   help="'auto' (an LLM or offline extractor, safe_jax.text.subjects), 'none', or phrases separated by "
                        "';'; give once for all prompts or once per prompt")
    s.add_argument("--subject-weight", type=float_in(0.0, low_open=True), default=None,
                   help="weight of the subject tokens (default: 1.1² = 1.21, Compel's ++, the paper's)")
    s.add_argument("--weighting", choices=("compel", "a1111"), default="compel",
                   help="compel: z∅ + w(z − z∅); a1111: z·w with the mean restored")
    s.add_argument("--subject-format", default="plain",
                   help="plain, prefix ('A photo of s1, s2. <caption>'), or a template with {subjects} and {caption}")
    s.add_argument("--prompt-syntax", choices=("none", "compel", "a1111"), default="none",
                   help="read hand-written weights in the prompts, e.g. (Boris Johnson)++ or (Boris Johnson:1.21)")
    args = p.parse_args(argv)
    if args.seed + len(args.prompt) - 1 > MAX_SEED:
        p.error(f"argument --seed: seed + number of prompts - 1 must be ≤ {MAX_SEED}, got {args.seed + len(args.prompt) - 1}")
    return args


def resolve_subjects(specs: list[str] | None, prompts: list[str]) -> list[list[str]] | None:
    """``--subjects`` values → one phrase list per prompt, or None when no subject weighting is asked for."""
    from safe_jax.errors import SafeJaxError

    if not specs:
        return None
    if len(specs) not in (1, len(prompts)):
        raise SafeJaxError(f"--subjects given {len(specs)} times for {len(prompts)} prompts: give it once or once per prompt")
    specs = specs * len(prompts) if len(specs) == 1 else specs
    keywords = [spec.strip().lower() for spec in specs]
    if all(k == "none" for k in keywords):
        return None
    auto = [prompt for prompt, k in zip(prompts, keywords) if k == "auto"]
    extracted = _extract(auto) if auto else []
    if len(extracted) != len(auto):
        raise SafeJaxError(f"subject extraction returned {len(extracted)} lists for {len(auto)} prompts")
    extracted = iter(extracted)
    subjects = []
    for spec, k in zip(specs, keywords):
        if k == "auto":
            subjects.append(list(next(extracted)))
        elif k == "none":
            subjects.append([])
        else:
            subjects.append([phrase.strip() for phrase in spec.split(";") if phrase.strip()])
    return subjects


def _extract(captions: list[str]) -> list[list[str]]:
    from safe_jax.errors import SafeJaxError

    try:
        from safe_jax.text.subjects import extract  # imported here: it is only needed for --subjects auto
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("safe_jax.text.subjects"):
            raise
        raise SafeJaxError("--subjects auto needs the safe_jax.text.subjects package, which is not installed") from None
    return extract(captions)


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n] or "image"


def main(argv: list[str] | None = None, prog: str = "safe-jax generate") -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv, prog)

    @one_line_errors(prog)
    def run() -> int:
        import jax.numpy as jnp
        from PIL import Image, PngImagePlugin
        from tqdm import tqdm

        from safe_jax.sampling.stable_diffusion import StableDiffusion
        from safe_jax.text.conditioning import DEFAULT_WEIGHT

        t0 = time.perf_counter()
        dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, None: None}[args.dtype]
        pipe, params = StableDiffusion.from_pretrained(args.model, dtype=dtype, seed=args.init_seed)
        print(f"loaded {args.model} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        scheduler = args.scheduler or pipe.default_sampler
        prompts = args.prompt
        subjects = resolve_subjects(args.subjects, prompts)
        syntax = None if args.prompt_syntax == "none" else args.prompt_syntax
        weight = DEFAULT_WEIGHT if args.subject_weight is None else args.subject_weight
        weighting = dict(subject_weight=weight, weighting=args.weighting,
                         subject_format=args.subject_format, prompt_syntax=syntax)
        pipe.token_weights(prompts, subjects, weight, args.subject_format, syntax)  # bad input: fail now
        args.out.mkdir(parents=True, exist_ok=True)
        with tqdm(total=len(prompts), desc="generating", unit="img") as bar:
            for start in range(0, len(prompts), args.batch_size):
                chunk = prompts[start:start + args.batch_size]
                chunk_subjects = None if subjects is None else subjects[start:start + args.batch_size]
                seed = args.seed + start  # image start + j gets seed + j: its own seed, whatever the batching
                images = pipe.generate(params, chunk, negative_prompts=args.negative_prompt, num_steps=args.steps,
                                       guidance_scale=args.guidance, scheduler=scheduler, seed=seed,
                                       height=args.height, width=args.width, subjects=chunk_subjects, **weighting)
                for j, (prompt, image) in enumerate(zip(chunk, images)):
                    settings = {"prompt": prompt, "negative_prompt": args.negative_prompt, "model": str(args.model),
                                "steps": args.steps, "guidance_scale": args.guidance, "scheduler": scheduler,
                                "seed": seed + j, "index": start + j, "height": int(image.shape[0]),
                                "width": int(image.shape[1]), "dtype": args.dtype or "default",
                                "init_seed": args.init_seed}
                    if chunk_subjects is not None or syntax is not None:
                        settings.update(weighting, subjects=None if chunk_subjects is None else chunk_subjects[j])
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
