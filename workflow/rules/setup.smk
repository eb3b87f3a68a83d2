# What the Snakefile needs before it validates the config: the package importable (here and in every job),
# and a config small enough to validate.
import os
import sys
from pathlib import Path

# The package under src/ holds all logic. Make it importable here and in every job, installed or not.
SRC = str(Path(workflow.basedir) / "src")
sys.path.insert(0, SRC)
# (This sets PYTHONPATH rather than requiring it: jobs inherit it, locally and through SLURM.)
os.environ.update(
    PYTHONPATH=os.pathsep.join(p for p in (SRC, os.getenv("PYTHONPATH")) if p)
)

from dermcompress.config import refuse_alias_bomb, schema_errors_in_one_line

# A YAML alias bomb in a --configfile (a few lines, billions of values) would hang validation, which prints the
# value it rejects: refuse it first, naming its key.
refuse_alias_bomb(config)
