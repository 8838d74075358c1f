"""safe-jax pretrain: train one model of the synthetic news world from scratch, from a config file.

    safe-jax pretrain --config launch/configs/world_vae.py [--config.steps=500] [--stop-at=100]
    safe-jax pretrain --config launch/configs/world_clip_reward.py:quick     # a smoke run
    python -m launch.pretrain --config launch/configs/world_unet.py

The world's Stable Diffusion is four runs, in this order (``make world``): world_vae,
world_clip_reward, world_clip_judge, world_unet (which reads the first two's exports). Each writes
<workdir>/export/ (a diffusers or transformers folder), metrics.jsonl, loss.png, samples/ and
summary.json. Re-running a command resumes from its latest checkpoint, bit for bit; a finished
run says so. ``--stop-at N`` saves at step N and stops there (the schedule is still the full run's),
for measuring a run's speed or splitting it. SIGTERM or Ctrl-C saves and exits.

Exit codes: 0 finished, stopped or preempted (resumable); 2 bad input (one line on stderr naming
the flag or config field, before anything is compiled); 1 an unexpected error (one line; the
traceback in <workdir>/traceback.log, also printed when SAFE_JAX_TRACEBACK=1); 130 Ctrl-C outside
the training loop.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from launch.cli_errors import one_line_errors
from launch.console import log_to_console


class _Flags:
    """This command's flags, defined afresh for every ``main`` call: config_flags defines one
    absl flag per --config.KEY override it parses, and a second parse in the same
    FlagValues would define them twice."""

    def __init__(self):
        self.values = flags.FlagValues()
        self.config = config_flags.DEFINE_config_file("config", None, "a config file (launch/configs/world_*.py)",
                                                      flag_values=self.values, lock_config=True)
        self.stop_at = flags.DEFINE_integer("stop_at", None, "save at this step and stop (the run resumes from it)",
                                            flag_values=self.values)


def main(argv: list[str] | None = None, prog: str = "safe-jax pretrain") -> int:
    argv = [prog] + [("--stop_at" + a[len("--stop-at"):]) if a.startswith("--stop-at") else a
                     for a in (sys.argv[1:] if argv is None else list(argv))]
    f = _Flags()
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(__doc__.strip() + "\n\nflags:\n" + f.values.get_help(), file=sys.stderr)
        return 0
    saved, sys.argv = sys.argv, argv  # config_flags reads --config.KEY overrides from sys.argv
    try:
        problem = _parse(f, argv)
        config = f.config.value if problem is None else None
    finally:
        sys.argv = saved
    if problem is None:
        log_to_console()
        problem = _check(config, f.stop_at.value)
    if problem is not None:
        print(f"{prog}: error: {problem}", file=sys.stderr)
        return 2

    @one_line_errors(prog)
    def run() -> int:
        from safe_jax.pretrain.loop import train

        result = train(config, stop_at=f.stop_at.value)
        if not result.already_finished:
            plot = write_loss_plot(result.workdir, result.curves, config.task)
            print(f"{prog}: loss curves in {plot}" if plot else f"{prog}: no metrics to plot", file=sys.stderr)
        status = "already finished" if result.already_finished else result.status
        print(f"{prog}: {status} at step {result.step}; workdir {result.workdir}"
              + (f"; exported to {result.export_dir}" if result.export_dir else ""), file=sys.stderr)
        return 0

    try:
        return run()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (nothing saved since the last checkpoint)", file=sys.stderr)
        return 130
    except Exception as e:
        from launch.train import _save_traceback  # the one traceback.log writer

        where = _save_traceback(Path(config.workdir))
        if os.environ.get("SAFE_JAX_TRACEBACK"):
            traceback.print_exc()
        text = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"{prog}: error: unexpected {type(e).__name__}: {text}"
              + (f"; traceback in {where}" if where else ""), file=sys.stderr)
        return 1


def write_loss_plot(workdir: Path, keys: tuple[str, ...], title: str) -> Path | None:
    """<workdir>/loss.png from metrics.jsonl: one panel per key the run logged."""
    from launch.report import plot_curves, read_metrics

    path = Path(workdir) / "metrics.jsonl"
    records = read_metrics(path) if path.is_file() else []
    keys = [k for k in keys if any(k in r for r in records)]
    if not keys:
        return None
    smooth = max(len(records) // 40, 1)
    return plot_curves(records, keys, Path(workdir) / "loss.png", title=f"pretrain {title}",
                       smooth=smooth if smooth > 1 else 0)


def _parse(f: _Flags, argv: list[str]) -> str | None:
    """Parse the flags; what is wrong with them, in one line naming the flag, or None."""
    from launch.train import _load_config_file, _override_problem

    try:
        rest = f.values(argv)
        config = f.config.value
        if config is not None:
            config.get("workdir")  # a config file that failed to load raises its error on first use
    except Exception as e:  # absl's flags.Error, and whatever loading the file or an override raised
        problem, config = _load_config_file(argv)
        return problem or _override_problem(argv, config) or (
            str(e) if isinstance(e, flags.Error) else
            f"--config: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1]}")
    if len(rest) > 1:
        return f"unexpected argument {rest[1]!r} (config values are set as --config.KEY=VALUE)"
    if f.config.value is None:
        return "--config is required (e.g. launch/configs/world_vae.py)"
    return None


def _check(config, stop_at: int | None) -> str | None:
    from safe_jax.errors import SafeJaxError
    from safe_jax.pretrain.config_check import validate

    try:
        validate(config)
    except SafeJaxError as e:
        return str(e)
    steps = config.steps
    if stop_at is not None and not 1 <= stop_at <= steps:
        return f"--stop-at must be in [1, config.steps = {steps}], got {stop_at}"
    return None


if __name__ == "__main__":
    sys.exit(main())
