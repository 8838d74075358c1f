"""safe-jax train: SAFE domain fine-tuning from an ml_collections config file.

    safe-jax train --config launch/configs/tiny_safe.py [--config.key=value ...]
    python -m launch.train --config launch/configs/sd15_safe.py --config.model=/models/sd15

Multi-host: every process runs the same command. On a TPU pod and under SLURM, JAX finds the
coordinator itself; elsewhere pass --coordinator=HOST:PORT --num-processes=N --process-id=I.
Re-running a command resumes from its workdir's latest checkpoint; re-running a finished run
says so and exits. SIGTERM or Ctrl-C saves a checkpoint and exits (a second Ctrl-C stops at once).

Exit codes: 0 finished, preempted or interrupted (resumable); 2 bad input (one line on stderr
naming the flag or config field, before anything is compiled); 1 an unexpected error: one line on
stderr naming the last good checkpoint, the traceback in <workdir>/traceback.log (process i > 0:
traceback.<i>.log), also printed when SAFE_JAX_TRACEBACK=1; 130 Ctrl-C outside the training loop
(loading, compiling) or a second Ctrl-C in it.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys
import time
import traceback
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from launch.console import log_to_console
from launch.cli_errors import one_line_errors

FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file("config", None, "a config file (launch/configs/*.py)", flag_values=FLAGS,
                                          lock_config=True)
_COORDINATOR = flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0, for explicit multi-host runs",
                                   flag_values=FLAGS)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the run", flag_values=FLAGS)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index", flag_values=FLAGS)
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout", 100,
                                 "seconds without a heartbeat before JAX's distributed runtime declares a process dead "
                                 "and stops the others (so a crashed host ends the run instead of hanging it)",
                                 lower_bound=1, flag_values=FLAGS)
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "auto: initialise JAX's distributed runtime when --coordinator is given, "
                                 "under a multi-task SLURM job, or on a multi-worker TPU VM", flag_values=FLAGS)


def _cluster_detected() -> bool:
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    return len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def init_distributed() -> None:
    import jax

    explicit = _COORDINATOR.value is not None
    if _DISTRIBUTED.value == "off" or (_DISTRIBUTED.value == "auto" and not explicit and not _cluster_detected()):
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes: collectives over TCP
    if explicit:
        jax.distributed.initialize(_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value, heartbeat_timeout_seconds=_HEARTBEAT.value)
    else:  # SLURM / TPU: the cluster environment says who is who
        jax.distributed.initialize(heartbeat_timeout_seconds=_HEARTBEAT.value)


def main(argv: list[str] | None = None, prog: str = "safe-jax train") -> int:
    argv = [prog] + [_absl_name(a) for a in (sys.argv[1:] if argv is None else list(argv))]
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(__doc__.strip() + "\n\nflags:\n" + FLAGS.get_help(), file=sys.stderr)
        return 0
    problem = _parse(argv)
    if problem is None:
        log_to_console()  # before the checks import orbax, whose absl logging would set up the root logger
        problem = _check_config()
    if problem is not None:
        print(f"{prog}: error: {problem}", file=sys.stderr)
        return 2

    @one_line_errors(prog)
    def run() -> int:
        init_distributed()
        from safe_jax.train.loop import train

        result = train(_CONFIG.value)
        status = "already finished" if result.already_finished else result.status
        print(f"{prog}: {status} at step {result.step}; workdir {result.workdir}"
              + (f"; exported to {result.export_dir}" if result.export_dir else ""), file=sys.stderr)
        return 0

    try:
        return run()
    except KeyboardInterrupt as e:  # Ctrl-C before the loop (loading, compiling) or a second one in it
        print(f"{prog}: interrupted ({_notes(e) or 'nothing saved'})", file=sys.stderr)
        return 130
    except Exception as e:
        where = _save_traceback(Path(_CONFIG.value.workdir))
        if os.environ.get("SAFE_JAX_TRACEBACK"):
            traceback.print_exc()
        text = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"{prog}: error: unexpected {type(e).__name__}: {text}"
              + (f" ({_notes(e)})" if _notes(e) else "")
              + (f"; traceback in {where}" if where else ""), file=sys.stderr)
        return 1


# The other commands spell flags with dashes (argparse); absl names them with underscores.
_DASHED = {"--num-processes": "--num_processes", "--process-id": "--process_id"}


def _absl_name(arg: str) -> str:
    """``--num-processes=2`` → ``--num_processes=2``: one flag style across the commands."""
    name, sep, value = arg.partition("=")
    return _DASHED.get(name, name) + sep + value


def _parse(argv: list[str]) -> str | None:
    """Parse the flags; what is wrong with them, in one line naming the flag, or None."""
    try:
        rest = FLAGS(argv)
        config = _CONFIG.value
        if config is not None:
            config.get("workdir")  # a config file that failed to load raises its error on first use
    except Exception as e:  # absl's flags.Error, and whatever loading the config file or an override raised
        problem, config = _load_config_file(argv)
        return problem or _override_problem(argv, config) or (
            str(e) if isinstance(e, flags.Error) or type(e).__name__ == "FlagOrderError" else
            f"--config: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1]}")
    if len(rest) > 1:
        return f"unexpected argument {rest[1]!r} (config values are set as --config.KEY=VALUE)"
    if _CONFIG.value is None:
        return "--config is required (e.g. launch/configs/tiny_safe.py)"
    return None


def _config_path(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg[len("--config="):]
    return None


def _load_config_file(argv: list[str]) -> tuple[str | None, object]:
    """(why the --config file cannot be loaded or None, the config it gives or None)."""
    path = _config_path(argv)
    if path is None:
        return None, None
    file = Path(path.split(":", 1)[0])
    if not file.is_file():
        return f"--config: no such config file: {file}", None
    try:
        spec = importlib.util.spec_from_file_location("safe_jax_train_config", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return None, module.get_config(*path.split(":", 1)[1:])
    except Exception as e:  # a syntax error or an exception in the file
        return f"--config: cannot load {file}: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1]}", None


def _override_problem(argv: list[str], config: object) -> str | None:
    """The first --config.KEY that names no field of ``config``, or None."""
    from ml_collections import ConfigDict

    if not isinstance(config, ConfigDict):
        return None
    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        name = arg[2:].split("=", 1)[0]
        node, parts = config, name.split(".")[1:]
        for i, part in enumerate(parts):
            where = ".".join(["config", *parts[:i]])
            if not isinstance(node, ConfigDict):
                return f"--{name}: {where} is a value, not a group of fields"
            if part not in node:
                near = difflib.get_close_matches(part, list(node.keys()), n=1)
                return (f"--{name}: {where} has no field {part!r}"
                        + (f" (did you mean {where}.{near[0]}?)" if near else ""))
            node = node[part]
    return None


def _check_config() -> str | None:
    """The launch flags and every config field, checked before JAX starts (the mesh against the
    devices is checked again once they are known, at the top of ``train``)."""
    from safe_jax.errors import SafeJaxError
    from safe_jax.train.config_check import validate_config

    n, i = _NUM_PROCESSES.value, _PROCESS_ID.value
    if n is not None and n < 1:
        return f"--num-processes must be ≥ 1, got {n}"
    if i is not None and not 0 <= i < (n or 1):
        return f"--process-id must be in [0, --num-processes), got {i}"
    if _COORDINATOR.value is not None:
        host, _, port = _COORDINATOR.value.rpartition(":")
        if not host or not port.isdigit():
            return f"--coordinator must be HOST:PORT, got {_COORDINATOR.value!r}"
        if n is None or i is None:
            return "--coordinator needs --num-processes and --process-id"
    try:
        validate_config(_CONFIG.value, check_devices=False)
    except SafeJaxError as e:
        return str(e)
    return None


def _notes(e: BaseException) -> str:
    return "; ".join(getattr(e, "__notes__", []))


def _save_traceback(workdir: Path) -> Path | None:
    """Append the current exception's traceback to the workdir's traceback log; its path, or None."""
    try:
        import jax

        index = jax.process_index()
    except Exception:
        index = 0
    path = workdir / ("traceback.log" if index == 0 else f"traceback.{index}.log")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n{traceback.format_exc()}\n")
    except OSError:
        return None
    return path


if __name__ == "__main__":
    sys.exit(main())
