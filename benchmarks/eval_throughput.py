"""Images/s of the evaluation's models against their PyTorch references, side by side in one run.

(a) generation: ``StableDiffusion.generate`` against diffusers' ``StableDiffusionPipeline`` loaded
    from the same folder (our ``save_pretrained`` of random weights), same prompts, steps, guidance,
    batch and sampler (DDIM), fp32 on the CPU.
(b) metric models, batch 8, fp32, random weights of the real architectures:
    - CLIP ViT-B/32 (FID_CLIP) and ViT-L/14 (CLIPScore) image + text towers: our Flax CLIPModel
      against transformers' CLIPModel;
    - HPS v2 (open_clip ViT-H-14) and ImageReward (BLIP ViT-L/16 + BERT): ours here, the reference
      in the reference environment (--refenv, default .refenv), which alone has open_clip and
      ImageReward, timed by the same protocol in a subprocess of this run.
Rounds alternate the order of the two sides; each figure is the median over rounds of one call
(compilation excluded: one warm-up call first). Goal: ours ≤ 1.0× the reference's time.

    python benchmarks/eval_throughput.py                  # everything (~20 min on 2 cores)
    python benchmarks/eval_throughput.py --only generation,clip-b32 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PARTS = ("generation", "clip-b32", "clip-l14", "hps", "imagereward")


def median_time(fn, rounds: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def side_by_side(ours, theirs, rounds: int) -> tuple[float, float]:
    """Alternate one timed call of each side per round, the order flipped every round."""
    ours(), theirs()
    a, b = [], []
    for r in range(rounds):
        pair = [(ours, a), (theirs, b)] if r % 2 == 0 else [(theirs, b), (ours, a)]
        for fn, into in pair:
            t0 = time.perf_counter()
            fn()
            into.append(time.perf_counter() - t0)
    return statistics.median(a), statistics.median(b)


def report(name: str, batch: int, ours: float, theirs: float, reference: str) -> dict:
    ratio = ours / theirs
    print(f"{name:28s} ours {batch / ours:8.2f} img/s ({ours:7.3f} s/batch)   {reference} {batch / theirs:8.2f} img/s "
          f"({theirs:7.3f} s/batch)   ratio {ratio:5.2f}x {'(goal ≤ 1.0: met)' if ratio <= 1.0 else '(goal ≤ 1.0: NOT met)'}",
          flush=True)
    return {"name": name, "ours_s": ours, "reference_s": theirs, "ratio": ratio, "batch": batch}


def bench_generation(args) -> dict:
    import numpy as np
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from safe_jax.sampling.stable_diffusion import StableDiffusion

    pipe, params = StableDiffusion.from_pretrained(args.generation_preset, seed=0)
    prompts = [f"Protesters gather outside the town hall in Leeds, picture {i}" for i in range(args.batch)]
    with tempfile.TemporaryDirectory() as folder:
        pipe.save_pretrained(params, folder)
        ours_pipe, ours_params = StableDiffusion.from_pretrained(folder)
        ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
        ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
        ref.set_progress_bar_config(disable=True)

        def ours():
            np.asarray(ours_pipe.generate(ours_params, prompts, num_steps=args.steps, guidance_scale=7.5, seed=0))

        def theirs():
            with torch.no_grad():
                ref(prompts, num_inference_steps=args.steps, guidance_scale=7.5, output_type="np",
                    generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))])

        t_ours, t_ref = side_by_side(ours, theirs, args.rounds)
    return report(f"generation {args.generation_preset} {args.steps} steps", args.batch, t_ours, t_ref, "diffusers")


def bench_clip(args, preset: str) -> dict:
    import jax
    import numpy as np
    import torch
    import transformers

    from safe_jax.io.clip_folder import init_params
    from safe_jax.io.convert import flax_to_torch
    from safe_jax.models.clip_vision import PRESETS, CLIPModel

    config = PRESETS[preset]
    model = CLIPModel(config)
    params = init_params(model, 0)
    ref = transformers.CLIPModel._from_config(transformers.CLIPConfig(**config.to_hf()), attn_implementation="sdpa")
    ref.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in flax_to_torch(params).items()})
    ref.eval()
    size = config.vision.image_size
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((args.batch, size, size, 3)).astype(np.float32)
    ids = rng.integers(1, 49000, (args.batch, 77)).astype(np.int32)
    forward = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t)["logits_per_image"])
    torch_pixels, torch_ids = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()), torch.from_numpy(ids).long()

    def ours():
        forward(params, pixels, ids).block_until_ready()

    def theirs():
        with torch.no_grad():
            ref(pixel_values=torch_pixels, input_ids=torch_ids)

    t_ours, t_ref = side_by_side(ours, theirs, args.rounds)
    return report(f"CLIP {preset} (image+text)", args.batch, t_ours, t_ref, "transformers")


def bench_with_refenv(args, part: str) -> dict:
    """Ours here; the reference's median from the reference environment, same batch and rounds."""
    ours = {"hps": _ours_hps, "imagereward": _ours_imagereward}[part](args)
    refenv = Path(args.refenv) / "bin" / "python"
    if not refenv.exists():
        print(f"{part:28s} ours {args.batch / ours:8.2f} img/s; reference skipped: no {refenv} (make reference-fixtures builds it)")
        return {"name": part, "ours_s": ours, "reference_s": None, "ratio": None, "batch": args.batch}
    script = ROOT / "benchmarks" / "reference_models_time.py"
    result = subprocess.run([str(refenv), str(script), part, "--batch", str(args.batch), "--rounds", str(args.rounds)],
                            capture_output=True, text=True, check=True)
    theirs = json.loads(result.stdout.strip().splitlines()[-1])["median_s"]
    return report(part, args.batch, ours, theirs, "reference")


def _ours_hps(args) -> float:
    import jax
    import numpy as np

    from safe_jax.eval import hps
    from safe_jax.io.clip_folder import init_params
    from safe_jax.models.clip_vision import PRESETS, CLIPModel

    model = CLIPModel(PRESETS["clip-vit-h-14"])  # open_clip's ViT-H-14 (HPS v2) in transformers' layout
    params = init_params(model, 0)
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((args.batch, 224, 224, 3)).astype(np.float32)
    ids = hps.tokenize(["a photo of a cat"] * args.batch)
    score = jax.jit(lambda p, x, t: hps.hps_score(model, p, x, t))
    return median_time(lambda: score(params, pixels, ids).block_until_ready(), args.rounds)


def _ours_imagereward(args) -> float:
    import jax
    import numpy as np

    from safe_jax.io.image_reward import init_params
    from safe_jax.models import blip

    model = blip.ImageRewardModel(blip.preset("large"))
    params = init_params(model, 0)
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((args.batch, 224, 224, 3)).astype(np.float32)
    ids = rng.integers(1000, 30000, (args.batch, 35)).astype(np.int32)
    mask = np.ones_like(ids)
    score = jax.jit(lambda p, x, t, m: model.apply({"params": p}, x, t, m))
    return median_time(lambda: score(params, pixels, ids, mask).block_until_ready(), args.rounds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(PARTS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20, help="generation: sampler steps")
    p.add_argument("--generation-preset", default="tiny")
    p.add_argument("--refenv", default=str(ROOT / ".refenv"))
    args = p.parse_args()
    results = []
    for part in args.only.split(","):
        if part == "generation":
            results.append(bench_generation(args))
        elif part == "clip-b32":
            results.append(bench_clip(args, "clip-vit-base-patch32"))
        elif part == "clip-l14":
            results.append(bench_clip(args, "clip-vit-large-patch14"))
        elif part in ("hps", "imagereward"):
            results.append(bench_with_refenv(args, part))
        else:
            raise SystemExit(f"unknown part {part!r} (choose from {', '.join(PARTS)})")
    print(json.dumps({"cpus": os.cpu_count(), "results": results}))


if __name__ == "__main__":
    main()
