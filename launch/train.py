"""safe-jax train: SAFE domain fine-tuning from an ml_collections config file.

    safe-jax train --config launch/configs/tiny_safe.py [--config.key=value ...]
    python -m launch.train --config launch/configs/sd15_safe.py --config.model=/models/sd15

Multi-host: every process runs the same command. On a TPU pod and under SLURM, JAX finds the
coordinator itself; elsewhere pass --coordinator=HOST:PORT --num_processes=N --process_id=I.
Re-running a command resumes from its workdir's latest checkpoint.
"""

from __future__ import annotations

import os
import sys

from absl import flags
from ml_collections import config_flags

from launch.console import log_to_console
from launch.errors import one_line_errors

FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file("config", None, "a config file (launch/configs/*.py)", flag_values=FLAGS,
                                          lock_config=True)
_COORDINATOR = flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0, for explicit multi-host runs",
                                   flag_values=FLAGS)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the run", flag_values=FLAGS)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index", flag_values=FLAGS)
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
                                   process_id=_PROCESS_ID.value)
    else:
        jax.distributed.initialize()  # SLURM / TPU: the cluster environment says who is who


def main(argv: list[str] | None = None, prog: str = "safe-jax train") -> int:
    argv = [prog] + (sys.argv[1:] if argv is None else list(argv))
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(__doc__.strip() + "\n\nflags:\n" + FLAGS.get_help(), file=sys.stderr)
        return 0
    try:
        FLAGS(argv)
    except flags.Error as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    if _CONFIG.value is None:
        print(f"{prog}: error: --config is required (e.g. launch/configs/tiny_safe.py)", file=sys.stderr)
        return 2
    log_to_console()

    @one_line_errors(prog)
    def run() -> int:
        init_distributed()
        from safe_jax.train import train

        result = train(_CONFIG.value)
        print(f"{prog}: {result.status} at step {result.step}; workdir {result.workdir}"
              + (f"; exported to {result.export_dir}" if result.export_dir else ""), file=sys.stderr)
        return 0

    return run()


if __name__ == "__main__":
    sys.exit(main())
