"""safe-jax eval: draw images for a set of prompts with one or more models and score them as the paper does.

    safe-jax eval --model base=PATH --model safe=EXPORT --prompts anchor/sample:test \\
        --clip CLIP_DIR --fid-clip CLIP_B32_DIR --pickscore PICKSCORE_DIR --hps HPS_v2.1_compressed.pt \\
        --imagereward ImageReward.pt --cmmd-clip CLIP_L14_336_DIR --out out/eval

Writes DIR/images/<row>/<id>_<seed>.png, DIR/scores.jsonl (one line per image), DIR/results.json
(per row and metric: mean, std over seeds, n, 95% bootstrap interval; FID_CLIP and CMMD pooled
and per seed) and DIR/report.md with grids and charts. A re-run skips every image and score that
exists, so a killed run resumes and a metric added later needs no new images.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from safe_jax.sampling import SAMPLERS
from launch.cli_errors import ArgumentParser, float_in, int_at_least, multiple_of, one_line_errors, output_dir



def _checkpoint(text: str) -> Path:
    """A metric model: a path, or a shipped preset's name (tiny-anchor-judge, tiny-anchor-reward)."""
    from safe_jax.errors import SafeJaxError
    from safe_jax.io import presets

    try:
        return Path(presets.resolve(text))
    except SafeJaxError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not seeds or any(s < 0 or s > 2 ** 32 - 1 for s in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct integers in [0, 2^32), got {text!r}")
    return seeds


def _choices_list(known: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in known]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad) or 'empty value'} (choose from {', '.join(known)})")
        return list(dict.fromkeys(values))
    parse.__name__ = "list"
    return parse


def parse_args(argv: list[str], prog: str) -> argparse.Namespace:
    from safe_jax.eval.generation import SUBJECT_MODES
    from safe_jax.eval.metrics import METRICS
    from safe_jax.io.open_clip import OPEN_CLIP_ARCHS
    from safe_jax.models.blip import VISION_PRESETS

    p = ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, metavar="[NAME=]PATH_OR_PRESET",
                   help="a diffusers folder or a preset (tiny-anchor: trained; tiny, sd15, sd21, sd21-base: random "
                        "weights); repeat to compare; "
                        "NAME names its row (default: the folder's name)")
    p.add_argument("--prompts", required=True,
                   help="a JSONL file ({id, caption, subjects?, image?} per line) or a TFDS split NAME:SPLIT, "
                        "e.g. anchor/sample:test")
    p.add_argument("--metrics", type=_choices_list(tuple(METRICS)), default=None,
                   help=f"comma-separated, from {', '.join(METRICS)} (default: every metric whose model flag is given)")
    m = p.add_argument_group("metric models (local folders or files, or the shipped tiny-anchor-judge / "
                             "tiny-anchor-reward; nothing is downloaded)")
    m.add_argument("--clip", type=_checkpoint, help="a CLIPModel folder: clipscore and subject_recall")
    m.add_argument("--fid-clip", type=_checkpoint, help="OpenAI CLIP ViT-B/32 CLIPModel folder: fid_clip (clean-fid's clip_vit_b_32)")
    m.add_argument("--pickscore", type=_checkpoint, help="the PickScore_v1 CLIPModel folder")
    m.add_argument("--hps", type=Path, help="HPS_v2_compressed.pt or HPS_v2.1_compressed.pt (open_clip ViT-H-14)")
    m.add_argument("--imagereward", type=Path, help="ImageReward.pt (with med_config.json and a BERT tokenizer folder beside it)")
    m.add_argument("--cmmd-clip", type=_checkpoint, help="CLIP ViT-L/14@336 CLIPModel folder: cmmd")
    m.add_argument("--hps-arch", default="ViT-H-14", choices=sorted(OPEN_CLIP_ARCHS),
                   help="the OpenCLIP architecture of --hps (HPS v2 and v2.1: ViT-H-14)")
    m.add_argument("--imagereward-vision", default="large", choices=sorted(VISION_PRESETS),
                   help="the BLIP vision tower of --imagereward (ImageReward: large, ViT-L/16)")
    g = p.add_argument_group("generation")
    g.add_argument("--seeds", type=_seeds, default=[42, 371], help="comma-separated; image <id>_<seed> uses that seed")
    g.add_argument("--steps", type=int_at_least(1), default=100)
    g.add_argument("--guidance", type=float_in(0.0), default=7.5)
    g.add_argument("--scheduler", default="ddim", choices=SAMPLERS)
    g.add_argument("--height", type=multiple_of(8), default=None)
    g.add_argument("--width", type=multiple_of(8), default=None)
    g.add_argument("--subjects", type=_choices_list(SUBJECT_MODES), default=["none"],
                   help="none: plain captions; stored: the prompts' subjects weighted; auto: stored, else extracted. "
                        "Comma-separate to evaluate each model in several modes (rows NAME-plain, NAME-weighted)")
    g.add_argument("--subject-weight", type=float_in(0.0, low_open=True), default=None,
                   help="weight of subject tokens (default 1.1² = 1.21, the paper's)")
    g.add_argument("--limit", type=int_at_least(1), default=None, help="only the first N prompts")
    g.add_argument("--batch-size", type=int_at_least(1), default=8, help="images per compiled sampler call")
    g.add_argument("--init-seed", type=int_at_least(0), default=0, help="random weights of a preset model")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    p.add_argument("--metric-batch-size", type=int_at_least(1), default=16)
    p.add_argument("--data-dir", default=None, help="TFDS data_dir for a NAME:SPLIT --prompts")
    p.add_argument("--images-root", type=Path, default=None,
                   help="the folder that 'image' paths of a JSONL file are relative to (default: the file's folder)")
    p.add_argument("--distractors", type=int_at_least(1), default=9, help="subject_recall: distractor subjects per subject")
    p.add_argument("--out", type=output_dir, required=True)
    args = p.parse_args(argv)
    args.rows = _rows(p, args.model, args.subjects)
    return args


def _rows(p: ArgumentParser, specs: list[str], modes: list[str]):
    from safe_jax.errors import SafeJaxError
    from safe_jax.eval.generation import Row
    from safe_jax.io import presets

    models, names = [], set()
    for spec in specs:
        name, sep, model = spec.partition("=")
        if not sep:
            name, model = "", spec
        if not model:
            p.error(f"argument --model: empty path in {spec!r}")
        try:
            folder = presets.resolve(model)
        except SafeJaxError as e:
            p.error(f"argument --model: {e}")
        if folder not in presets.PRESETS:
            path = Path(folder)
            if not path.is_dir():
                p.error(f"argument --model: {model} is neither a folder nor a preset "
                        f"(tiny-anchor, {', '.join(presets.PRESETS)})")
            if not (path / "model_index.json").is_file():
                p.error(f"argument --model: {model} has no model_index.json (not a diffusers pipeline folder)")
        name = name or Path(model).name
        if not name or not all(c.isalnum() or c in "._-" for c in name) or name.startswith("."):
            p.error(f"argument --model: row name {name!r} must be letters, digits, '.', '_' or '-' (use NAME=PATH)")
        if name in names:
            p.error(f"argument --model: two models named {name!r}: name them with NAME=PATH")
        names.add(name)
        models.append((name, model))
    rows = []
    for name, model in models:
        for mode in modes:
            suffix = "" if len(modes) == 1 else "-" + {"none": "plain", "stored": "weighted", "auto": "weighted"}[mode]
            if "stored" in modes and "auto" in modes and mode != "none":
                suffix = f"-{mode}"
            rows.append(Row(name + suffix, model, mode))
    return rows


def main(argv: list[str] | None = None, prog: str = "safe-jax eval") -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv, prog)
    return one_line_errors(prog)(run)(args)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from launch.eval_report import write_eval_report
    from safe_jax.eval import metrics as metric_lib
    from safe_jax.eval.generation import GenerationSettings
    from safe_jax.eval.prompts import read_prompts
    from safe_jax.eval.runner import Evaluation
    from safe_jax.text.conditioning import DEFAULT_WEIGHT

    t0 = time.perf_counter()
    checkpoints = {"clip": args.clip, "fid_clip": args.fid_clip, "pickscore": args.pickscore, "hps": args.hps,
                   "imagereward": args.imagereward, "cmmd_clip": args.cmmd_clip}
    names = args.metrics or metric_lib.default_metrics(checkpoints)
    metric_lib.check_checkpoints(names, checkpoints)  # a missing or wrong file: one line naming the flag
    prompts = read_prompts(args.prompts, data_dir=args.data_dir,
                           images_root=None if args.images_root is None else str(args.images_root), limit=args.limit)
    prompts = _fill_subjects(prompts, args)
    metric_lib.check_prompts(names, prompts)
    settings = GenerationSettings(
        steps=args.steps, guidance=args.guidance, scheduler=args.scheduler, height=args.height, width=args.width,
        subject_weight=DEFAULT_WEIGHT if args.subject_weight is None else args.subject_weight,
        dtype=args.dtype or "default")
    metrics = [metric_lib.make_metric(name, checkpoints, batch_size=args.metric_batch_size,
                                      distractors=args.distractors, hps_arch=args.hps_arch,
                                      imagereward_vision=args.imagereward_vision) for name in names]
    evaluation = Evaluation(out=args.out, rows=args.rows, prompts=prompts, seeds=args.seeds, settings=settings,
                            metrics=metrics, batch_size=args.batch_size, init_seed=args.init_seed,
                            load_pipeline=lambda model: _load(model, args), progress=tqdm,
                            log=lambda text: print(text, file=sys.stderr))
    drawn = evaluation.draw()
    print(f"drew {drawn} images in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    document = evaluation.score()
    path = write_eval_report(args.out)
    from launch.eval_report import results_table

    print(results_table(document["results"]))
    print(f"wrote {args.out / 'results.json'}, {args.out / 'scores.jsonl'} and {path} "
          f"in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return 0


def _fill_subjects(prompts, args):
    """--subjects auto: prompts without stored subjects get extracted ones (an LLM or offline)."""
    import dataclasses

    from safe_jax.errors import SafeJaxError
    from safe_jax.eval.prompts import Subject

    if "stored" in args.subjects:
        missing = [p.id for p in prompts if p.subjects is None]
        if missing:
            raise SafeJaxError(f"--subjects stored: {len(missing)} prompts have no 'subjects' (first: {missing[0]}); "
                               "use --subjects auto to extract them")
    if "auto" not in args.subjects and "subject_recall" not in (args.metrics or []):
        return prompts
    missing = [p for p in prompts if p.subjects is None]
    if not missing:
        return prompts
    from launch.generate import _extract

    found = iter(_extract([p.caption for p in missing]))
    filled = {p.id: tuple(Subject(t) for t in next(found)) for p in missing}
    if len(filled) != len(missing):
        raise SafeJaxError("subject extraction returned fewer results than prompts")
    return [dataclasses.replace(p, subjects=filled[p.id]) if p.id in filled else p for p in prompts]


def _load(model: str, args):
    import jax.numpy as jnp

    from safe_jax.errors import SafeJaxError
    from safe_jax.sampling.stable_diffusion import StableDiffusion

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, None: None}[args.dtype]
    try:
        return StableDiffusion.from_pretrained(model, dtype=dtype, seed=args.init_seed)
    except SafeJaxError as e:
        raise SafeJaxError(f"--model {model}: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
