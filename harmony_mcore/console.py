"""What reaches the terminal: with `logging.console: ours`, our progress and results only.

The actors' own output (vLLM, Ray, Triton, NUMA, tcmalloc and deprecation messages of the libraries they load)
goes to one file per actor in `<run_dir>/logs/`, and Python warnings of the driver to `<run_dir>/logs/driver.log`,
where a user who needs them finds them. `logging.console: all` (the default for `harmony-mcore train`) leaves
everything on the terminal, as Ray forwards it.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


def actor_log(run_dir: str, name: str) -> str:
    """The log file of one actor (e.g. policy-0, engine-1)."""
    return str(Path(run_dir) / "logs" / f"{name}.log")


def redirect_output(path: str | None) -> None:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so also its C libraries' and the child
    processes it starts from now on) to `path`, appending. None: leave them."""
    if path is None:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def quiet_driver(run_dir: str) -> None:
    """Python warnings and library log records of the driver process go to `<run_dir>/logs/driver.log`."""
    path = Path(run_dir) / "logs" / "driver.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.captureWarnings(True)
    for name in ("py.warnings", "vllm", "ray", "transformers", "megatron", "torch"):
        log = logging.getLogger(name)
        log.handlers = [handler]
        log.propagate = False
