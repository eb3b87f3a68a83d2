"""Provenance: where every number came from.

fingerprint     the code a job runs (its module's import closure) and the package versions it imports
logs            job logging: the log file, the lineage records on success, none on failure
lineage         the API of the lineage records and the audit, over:
  hashes          sha256 of files and folders, remembered by size and mtime
  records         a job's record per output, kept in results/.lineage/records/ (a mirror of results/)
  walk            the walk from a result's record back to the raw files, and the images behind it
  checks          rehashing what the records name; every broken link reported, nothing unsafe read
  report          `dermcompress lineage`: the report as JSON and as text

May import: `data` and `learn` (lineage reads caches and run folders), `dermcompress.errors`; never `study` or
`config`. `fingerprint` imports nothing of the package, so every part may use it.
"""
