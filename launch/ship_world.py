"""Copy the world's trained models into the package as the shipped presets (the last step of `make world`).

    python -m launch.ship_world [--runs runs/world] [--quick]

    runs/world/unet/export        → safe_jax/weights/tiny-anchor         (diffusers StableDiffusionPipeline)
    runs/world/clip_reward/export → safe_jax/weights/tiny-anchor-reward  (transformers CLIPModel)
    runs/world/clip_judge/export  → safe_jax/weights/tiny-anchor-judge   (transformers CLIPModel)

Each folder is checked to load before anything is replaced, and the whole set must stay within
the package's weight budget (25 MB): a bigger model is a decision to take in the configs, not here.
The previous presets are replaced only once the new ones are complete (written beside, then renamed).
``--quick`` ships the `make world-quick` smoke runs instead, for trying the chain, never for release.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from launch.cli_errors import ArgumentParser, one_line_errors

BUDGET_BYTES = 25 * 10 ** 6
PARTS = {"tiny-anchor": "unet", "tiny-anchor-reward": "clip_reward", "tiny-anchor-judge": "clip_judge"}
# Files an export may hold that are not the model (the run's own records stay in the run).
_SKIP = {"export_info.json"}


def main(argv: list[str] | None = None, prog: str = "python -m launch.ship_world") -> int:
    p = ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, default=Path("runs/world"), help="where `make world` wrote its runs")
    p.add_argument("--quick", action="store_true", help="ship the *_quick smoke runs (for trying the chain)")
    p.add_argument("--to", type=Path, default=None, help="default: the package's safe_jax/weights")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    return one_line_errors(prog)(ship)(args.runs, args.to, args.quick)


def _files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.is_file() and not f.is_symlink() and f.name not in _SKIP)


def ship(runs: Path, to: Path | None, quick: bool = False) -> int:
    from safe_jax.errors import SafeJaxError
    from safe_jax.io import presets

    to = to or presets.WEIGHTS
    sources = {}
    for name, run in PARTS.items():
        export = runs / (run + ("_quick" if quick else "")) / "export"
        marker = export / ("model_index.json" if name == "tiny-anchor" else "config.json")
        if not marker.is_file():
            raise SafeJaxError(f"{export} holds no finished export ({marker.name} missing): run `make world` first")
        sources[name] = export
    total = sum(f.stat().st_size for export in sources.values() for f in _files(export))
    if total > BUDGET_BYTES:
        raise SafeJaxError(f"the world's models take {total / 1e6:.1f} MB, over the package's {BUDGET_BYTES / 1e6:.0f} MB")
    _check_loads(sources)
    to.mkdir(parents=True, exist_ok=True)
    provenance = {}
    for name, export in sources.items():
        staging = to / f".{name}.new"
        shutil.rmtree(staging, ignore_errors=True)
        for f in _files(export):
            target = staging / f.relative_to(export)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
        old = to / name
        if old.exists():
            shutil.rmtree(old)
        staging.rename(old)
        summary = export.parent / "summary.json"
        provenance[name] = {"run": str(export.parent), "quick": quick,
                            "summary": json.loads(summary.read_text()) if summary.is_file() else None}
    (to / "provenance.json").write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    print(f"shipped {', '.join(sources)} ({total / 1e6:.1f} MB) into {to}", file=sys.stderr)
    return 0


def _check_loads(sources: dict[str, Path]) -> None:
    """Every folder loads in our loaders before anything is replaced."""
    from safe_jax.io.clip_folder import load_clip
    from safe_jax.sampling.stable_diffusion import StableDiffusion

    StableDiffusion.from_pretrained(str(sources["tiny-anchor"]))
    for name in ("tiny-anchor-reward", "tiny-anchor-judge"):
        load_clip(sources[name])


if __name__ == "__main__":
    sys.exit(main())
