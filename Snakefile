# dermcompress: how much do pretrained models lose when dermoscopy images are shrunk and compressed?
# The rules live in workflow/rules/; the logic in src/dermcompress/. See README.md.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


# The package importable; a YAML alias bomb refused before validation, which would hang printing it.
include: "workflow/rules/setup.smk"


# An unknown or ill-typed key stops the run in one line: its path, what is wrong, the valid keys.
with schema_errors_in_one_line():
    validate(config, "workflow/schemas/config.schema.yaml")


report: "workflow/report/workflow.rst"


# How many jobs ingest and each resolution's resize are scattered over: 1 unless a profile says
# `set-scatter: [ingest=N, resize=N]` (workflow/rules/data.smk).
scattergather:
    ingest=1,
    resize=1,


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/aggregate.smk"


# The target rule runs no code, and aggregation only reads small run outputs: never cluster jobs (the figure
# rules, one per set of figure kinds, say so themselves: `localrule: True`).
localrules:
    all,
    data_summary,
    bytes_summary,
    runs_index,
    table,
    subgroups,


rule all:
    default_target: True
    input:
        get_final_outputs(),
