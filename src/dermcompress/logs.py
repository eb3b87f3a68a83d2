"""Logging for stage scripts: everything a job says goes to its Snakemake log file (and stderr)."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextmanager
def job_logging(job: Any, name: str = "dermcompress"):
    """Route the package's logging (and tqdm, which writes to stderr) to the job's log file.

    `job` is the Snakemake script's `snakemake` object (its first log file is used) or a log path (or None).
    Exceptions are logged with their traceback before they propagate, so a failed job's log says why.
    """
    log_path = job.log[0] if hasattr(job, "log") and job.log else job if isinstance(job, str | Path) else None
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    stderr = sys.stderr
    log_file = None
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        log_file = open(log_path, "w", buffering=1)  # noqa: SIM115 - closed in finally
        handlers = [logging.StreamHandler(log_file)]
        sys.stderr = log_file  # progress bars land in the log too
    logging.basicConfig(level=logging.INFO, format=FORMAT, handlers=handlers, force=True)
    logger = logging.getLogger(name)
    try:
        yield logger
    except Exception:
        logger.exception("job failed")
        raise
    finally:
        sys.stderr = stderr
        if log_file:
            log_file.close()
