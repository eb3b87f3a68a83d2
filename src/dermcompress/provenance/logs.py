"""Logging for stage scripts: everything a job says goes to its Snakemake log file (and stderr)."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dermcompress.learn.phases import process_seconds

from . import lineage

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextmanager
def job_logging(job: Any, name: str = "dermcompress"):
    """Route the package's logging (and tqdm, which writes to stderr) to the job's log file.

    `job` is the Snakemake script's `snakemake` object (its first log file is used) or a log path (or None).
    Exceptions are logged with their traceback before they propagate, so a failed job's log says why.
    A Snakemake job that succeeds writes a lineage record of each of its outputs (records.py); one that fails
    leaves none. The first line logged says how long the process took to get here (its start-up: interpreter,
    Snakemake's script preamble, the script's imports), timed from when the operating system created it.
    """
    log_path = job.log[0] if hasattr(job, "log") and job.log else job if isinstance(job, str | Path) else None
    is_job = hasattr(job, "output") and hasattr(job, "rule")
    # Under torchrun every rank runs the script; the first one speaks for the job (log file, lineage), the
    # others only warn, on stderr, without progress bars.
    rank = int(os.environ.get("RANK", "0"))
    writes_lineage = is_job and rank == 0
    if rank:
        log_path = None
        os.environ["TQDM_DISABLE"] = "1"
    started = lineage.now()
    if writes_lineage:
        lineage.clear_records(job)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    stderr = sys.stderr
    log_file = None
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        log_file = open(log_path, "w", buffering=1)  # noqa: SIM115 - closed in finally
        handlers = [logging.StreamHandler(log_file)]
        sys.stderr = log_file  # progress bars land in the log too
    level, fmt = (logging.WARNING, f"[rank {rank}] {FORMAT}") if rank else (logging.INFO, FORMAT)
    logging.basicConfig(level=level, format=fmt, handlers=handlers, force=True)
    logger = logging.getLogger(name)
    logger.info("started %.2f s after the process (interpreter and imports)", process_seconds())
    try:
        yield logger
        if writes_lineage:
            written = lineage.write_records(job, started=started)
            logger.info("lineage recorded in %s", ", ".join(map(str, written)))
    except Exception:
        logger.exception("job failed")
        raise
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which checkpoints and raises Preempted)
        logger.error("job interrupted by SIGINT (Ctrl-C): it stopped without finishing; nothing was recorded")
        raise
    finally:
        sys.stderr = stderr
        if log_file:
            log_file.close()


def exit_now() -> None:
    """End a finished job's process at once, skipping the interpreter's finalisation.

    Tearing down the thousands of modules torch and timm load costs ~0.6-1.3 s of CPU at every exit, and the
    workflow runs many short torch jobs side by side on few cores. Call it only after the job's `job_logging`
    block has ended normally: its outputs and lineage records are written and closed; this flushes the logging
    handlers and the standard streams, then exits with status 0. A job that raises never gets here, so it exits
    the usual way, with its traceback. Under torchrun (WORLD_SIZE > 1) it returns: each rank leaves its process
    group in an atexit handler (distributed.py), which only a normal exit runs.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
