"""Provenance: where every number came from.

fingerprint     the code a job runs (its module's import closure) and the package versions it imports
lineage         per-job records of inputs, outputs, code, host and times; the walk from a table row back to
                the raw images, with the checks that harden it; the text report of `dermcompress lineage`
logs            job logging: the log file, the lineage record on success, a clean exit on failure

May import: `data` and `learn` (lineage reads caches and run folders), `dermcompress.errors`; never `study` or
`config`. `fingerprint` imports nothing of the package, so every part may use it.
"""
