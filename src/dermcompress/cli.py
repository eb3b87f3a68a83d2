"""The `dermcompress` command: what users do outside Snakemake."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def _synth(args: argparse.Namespace) -> int:
    from dermcompress.synth import make_synthetic

    root = make_synthetic(Path(args.out), n=args.n, seed=args.seed, as_zip=args.zip)
    print(f"synthetic ISIC 2019 layout written to {root}")
    return 0


def _flops(args: argparse.Namespace) -> int:
    import json

    import yaml

    from dermcompress.flops import model_cost

    registry = None
    config = Path(args.config) if args.config else Path("config.yaml")
    if args.config or (":" not in args.arch and config.is_file()):
        if not config.is_file():
            raise SystemExit(f"dermcompress flops: no config file at {config}")
        registry = (yaml.safe_load(config.read_text()) or {}).get("models") or {}
    cost = model_cost(args.arch, resolution=args.res, registry=registry, num_classes=args.num_classes)
    print(json.dumps(cost))
    return 0


def _lineage(args: argparse.Namespace) -> int:
    import json

    from dermcompress.lineage import LineageError, format_text, trace

    try:
        report = trace(args.path, row=args.row, verify=not args.no_verify, external=args.external)
    except LineageError as err:
        raise SystemExit(f"dermcompress lineage: {err}") from None
    try:
        print(json.dumps(report, indent=2) if args.json else format_text(report).rstrip("\n"), flush=True)
    except BrokenPipeError:  # the reader stopped early (`| head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1 if report["broken"] else 0


def _plan(args: argparse.Namespace) -> int:
    import json

    from dermcompress.plan import format_plan, make_plan

    try:
        plan = make_plan(
            args.directory,
            configfiles=args.configfile,
            profile=args.profile or None,
            throughput=args.throughput,
            full_isic2019=args.full_isic2019,
        )
    except RuntimeError as err:
        raise SystemExit(f"dermcompress plan: {err}") from None
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dermcompress", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser(
        "synth",
        help="write a synthetic data set in the exact ISIC 2019 training layout",
        description="Write ISIC_2019_Training_Input/ (or .zip), the ground-truth CSV and the metadata CSV.",
    )
    synth.add_argument("out", help="folder to write into (created if missing)")
    synth.add_argument("--n", type=int, default=400, help="images listed in the ground truth (default 400)")
    synth.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    synth.add_argument(
        "--zip", action="store_true", help="write ISIC_2019_Training_Input.zip instead of a folder"
    )
    synth.set_defaults(func=_synth)

    flops = commands.add_parser(
        "flops",
        help="GMACs (attention included), parameters and effective input of a model at a resolution",
        description="Build the architecture without weights and print "
        '{"gmacs": ..., "params_m": ..., "effective_input_px": ...} as JSON (fvcore: one multiply-add = 1).',
    )
    flops.add_argument("arch", help="a name under models: in the config, or a source such as timm:resnet50")
    flops.add_argument("--res", type=int, required=True, help="input resolution in pixels (the cached size)")
    flops.add_argument(
        "--config", help="config file whose models: registry names are looked up in (default: ./config.yaml)"
    )
    flops.add_argument("--num-classes", type=int, default=2, help="classes of the linear head (default 2)")
    flops.set_defaults(func=_flops)

    lineage = commands.add_parser(
        "lineage",
        help="where a result comes from: stages, parameters, code, raw files and images, broken links",
        description="Walk from a result (a table, a table row, a run folder, a cache or one of its shards, any "
        "output of the workflow) back to the raw files through the lineage records the jobs wrote: each stage "
        "with its parameters and code, the raw images by id and sha256 per split. Every recorded hash is checked "
        "against the file on disk (regular files inside the workflow folder only); the exit status is 1 when one no "
        "longer matches, or a record is malformed or missing (a broken link).",
    )
    lineage.add_argument(
        "path", help="a result of the workflow, e.g. results/tables/table1.csv or a run folder"
    )
    lineage.add_argument("--row", type=int, help="for a table: the row (counted from 0) whose runs to follow")
    lineage.add_argument("--json", action="store_true", help="print the lineage as JSON instead of text")
    lineage.add_argument(
        "--no-verify", action="store_true", help="show what was recorded without hashing the files on disk"
    )
    lineage.add_argument(
        "--external",
        action="store_true",
        help="also rehash files outside the workflow folder (raw data kept elsewhere); by default they are listed "
        "as external and not read",
    )
    lineage.set_defaults(func=_lineage)

    plan = commands.add_parser(
        "plan",
        help="what a config costs before it runs: jobs, cluster submissions, image-passes, disk, GPU-hours",
        description="Plan the whole workflow with Snakemake (a dry run with a cluster profile, so jobs are "
        "grouped as they will be submitted) and count trainings, evaluations, feature extractions, GPU jobs and "
        "submissions, backbone image-passes, disk for weights, checkpoints and caches, and GPU-hours.",
    )
    plan.add_argument(
        "--configfile",
        nargs="*",
        default=[],
        help="overlays of config.yaml, as for snakemake (e.g. config.demo.yaml)",
    )
    plan.add_argument(
        "--profile",
        default="profiles/slurm-h100",
        help="the cluster profile whose grouping counts (default profiles/slurm-h100; '' for none)",
    )
    plan.add_argument(
        "--throughput", help="a CSV of measured images/s from benchmarks/gpu.py (default: an estimate)"
    )
    plan.add_argument(
        "--full-isic2019",
        action="store_true",
        help="size the plan for the whole ISIC 2019 training set, whatever data the config names",
    )
    plan.add_argument("--directory", default=".", help="the workflow folder (default: the current one)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(func=_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
