"""Job logging: the first line says how long the job's process took to start, measured right (as the phases' start-up
is)."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

from dermcompress.learn.phases import Phases
from dermcompress.provenance.logs import job_logging

CHILD = """
import time
from dermcompress.learn.phases import Phases, process_seconds
first = Phases.from_process_start().seconds["start-up"]
time.sleep(0.3)
print(first, process_seconds(), flush=True)
"""


def test_process_seconds_is_the_age_of_the_process():
    """Never more than the parent saw go by between starting the child and reading its answer (psutil's
    create_time, from the boot time in whole seconds, was up to a second more), and it counts a sleep."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout
    elapsed = time.perf_counter() - start
    first, later = map(float, out.split())
    assert first >= 0 and later <= elapsed
    assert 0.28 <= later - first <= 0.3 + 0.2


def test_the_first_log_line_is_the_start_up(tmp_path):
    log = tmp_path / "job.log"
    with job_logging(log) as logger:
        logger.info("work")
    first, second = log.read_text().splitlines()
    assert "started" in first and "s after the process" in first
    assert second.endswith("work")


def test_phases_time_named_phases_and_log_them(caplog):
    phases = Phases.from_process_start()
    with phases("setup"):
        time.sleep(0.12)
    with caplog.at_level(logging.INFO):
        phases.log()
    summary = phases.summary()
    assert summary["setup"] >= 0.12 and summary["total"] >= summary["start-up"] + summary["setup"]
    assert "wall time" in caplog.text and "setup 0.1 s" in caplog.text
