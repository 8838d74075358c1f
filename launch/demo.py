"""safe-jax demo: SAFE end to end on the embedded `anchor/sample` dataset, in minutes on a CPU.

    build anchor/sample ─► subjects (offline LLM stand-in) ─► fine-tune `tiny` (denoising + ReFL,
    all local devices) ─► checkpoints ─► export to diffusers ─► before/after image grids, with and
    without subject weighting ─► report.md with loss and reward plots

The `tiny` preset has random weights, so its images are not pictures: the demo shows every stage
running and measurable (losses, rewards, the effect of training on the same prompts and seeds).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from launch.console import log_to_console
from launch.cli_errors import ArgumentParser, int_at_least, one_line_errors, output_dir


def main(argv: list[str] | None = None, prog: str = "safe-jax demo") -> int:
    p = ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=output_dir, default="out/demo")
    p.add_argument("--steps", type=int_at_least(1), default=None, help="training steps (default: the tiny_safe config's)")
    p.add_argument("--prompts", type=int_at_least(1), default=4, help="validation captions in the image grids")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    log_to_console()
    return one_line_errors(prog)(run)(args.out, args.steps, args.prompts)


def run(out: Path, steps: int | None, num_prompts: int) -> int:
    import jax

    from launch import report
    from launch.configs import tiny_safe
    from safe_jax.data import data_source
    from safe_jax.data.source import as_text, as_texts
    from safe_jax.train.loop import train
    from safe_jax.train.metrics import finite_means

    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    data_dir = out / "tfds"
    say = lambda text: print(f"[demo] {text}", file=sys.stderr, flush=True)

    say("1/5 building anchor/sample (300 synthetic captioned images, subjects known by construction)")
    source = data_source("anchor/sample", "validation", str(data_dir))
    build_report = next(data_dir.glob("anchor/sample/*/build_report.json"), None)
    records = [source[i] for i in range(min(num_prompts, len(source)))]
    captions = [as_text(r["caption"]) for r in records]
    stored = [as_texts(r["subjects"]) for r in records]

    say("2/5 subjects of the validation captions (offline backend: no API key needed)")
    from safe_jax.text.subjects import extract

    found = extract(captions, backend="offline", progress=False)

    say("3/5 fine-tuning `tiny` with denoising + ReFL (DFE reward), LoRA rank 4, on "
        f"{jax.device_count()} local device(s)")
    config = tiny_safe.get_config()
    config.workdir = str(out / "run")
    config.data.data_dir = str(data_dir)
    if steps is not None:
        config.steps = steps
    config.sample.prompts = tuple(captions[:2])
    t_train = time.perf_counter()
    result = train(config)
    train_seconds = time.perf_counter() - t_train
    if result.status != "finished":
        say(f"stopped at step {result.step} ({result.status}); rerun to resume")
        return 1

    say(f"4/5 generating before/after grids from the base preset and the exported folder {result.export_dir}")
    grids, rewards_table = _before_after(out, config, result.export_dir, captions, stored, records)

    say("5/5 writing the report")
    metrics = report.read_metrics(result.metrics_path)
    loss_png = report.plot_curves(metrics, ["denoising_loss", "refl_loss"], out / "loss.png",
                                  title="Losses (denoising and ReFL steps alternate)", smooth=5)
    reward_png = report.plot_curves(metrics, ["reward"], out / "reward.png",
                                    title="ReFL: DFE reward of the one-step prediction x̂0", smooth=5)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "step"} for r in rows]
    first, last = finite_means(strip(metrics[:10])), finite_means(strip(metrics[-10:]))
    total = time.perf_counter() - t_start
    subjects_md = "\n".join(f"- {c}\n  - stored: {'; '.join(s) or '—'}\n  - offline now: {'; '.join(f) or '—'}"
                            for c, s, f in zip(captions, stored, found))
    sections = [
        ("What ran", f"`safe-jax demo` on {jax.device_count()} {jax.devices()[0].platform.upper()} device(s) "
                     f"in {total:.0f} s (training {train_seconds:.0f} s, {result.step} steps). Config: "
                     f"`launch/configs/tiny_safe.py` (resolved copy: `run/config.json`). Checkpoints: "
                     f"`run/checkpoints/`; TensorBoard: `tensorboard --logdir {out / 'run' / 'tensorboard'}`; "
                     f"exported diffusers folder and LoRA: `{result.export_dir}`. The `tiny` model has random "
                     "weights: images are not pictures, but every number below is measured."),
        ("Data", f"anchor/sample built into `{data_dir}`"
                 + (f" (build report: `{build_report.relative_to(out)}`)" if build_report else "") + "."),
        ("Subjects (SAFE part 1)", subjects_md),
        ("Training curves", report.image_link(loss_png, out, "loss") + "\n\n" + report.image_link(reward_png, out, "reward")
         + "\n\n" + report.summary_table([{"window": "first steps", **first}, {"window": "last steps", **last}],
                                         ["window", "loss", "denoising_loss", "refl_loss", "reward", "grad_norm",
                                          "images_per_s"])),
        ("Before and after, without and with subject weighting",
         "Same prompts and seeds in every row; weighted rows scale the subjects' tokens by "
         f"{config.subjects.weight:.4g} (Compel).\n\n" + report.image_link(grids, out, "grids")
         + "\n\nDFE reward (tiny CLIP caption score + α·ground-truth similarity) of the generated images:\n\n"
         + report.summary_table(rewards_table, ["model", "conditioning", "mean reward"])),
    ]
    path = report.write_report(out, "SAFE demo report", sections)
    (out / "summary.json").write_text(json.dumps({"steps": result.step, "seconds": total,
                                                  "train_seconds": train_seconds, "first": first, "last": last,
                                                  "rewards": rewards_table}, indent=2))
    say(f"done in {total:.0f} s: {path}")
    return 0


def _before_after(out: Path, config, export_dir: Path, captions, subjects, records):
    import jax.numpy as jnp
    import numpy as np

    from launch import report
    from safe_jax.data.transforms import load_image
    from safe_jax.sampling.stable_diffusion import StableDiffusion
    from safe_jax.train import rewards
    from safe_jax.train.loop import load_reward

    reward, reward_params, reward_text = load_reward(config)
    size = config.data.resolution
    gt = np.stack([np.asarray(load_image(r["image"], size, "center", False, dtype="uint8"), np.float32) for r in records]) / 255.0
    rows, labels, table = [], [], []
    for name, model in (("before", config.model), ("after", str(export_dir))):
        pipe, params = StableDiffusion.from_pretrained(model)
        for weighted in (False, True):
            kw = dict(subjects=subjects, subject_weight=config.subjects.weight) if weighted else {}
            images = pipe.generate(params, captions, num_steps=config.sample.steps, guidance_scale=config.sample.guidance,
                                   scheduler=config.sample.scheduler, seed=0, height=size, width=size, **kw)
            rows.append(list(images))
            cond = "subject-weighted" if weighted else "plain"
            labels.append(f"{name}, {cond}")
            batch = {"input_ids": jnp.asarray(pipe.tokenize(captions)), "gt_images": jnp.asarray(gt),
                     **rewards.text_batch(reward_text, captions)}
            r = reward(reward_params, jnp.asarray(images, jnp.float32) / 255.0, batch)
            table.append({"model": name, "conditioning": cond, "mean reward": float(np.mean(np.asarray(r)))})
    short = [c if len(c) <= 60 else c[:57] + "..." for c in captions]
    return report.image_grid(rows, labels, short, out / "grids.png"), table


if __name__ == "__main__":
    sys.exit(main())
