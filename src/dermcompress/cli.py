"""The `dermcompress` command: what users do outside Snakemake."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# dermcompress.data.fetch.SOURCES, named here so the parser imports no network code (tests/test_fetch.py checks).
FETCH_SOURCES = ("isic2019", "isic2020", "ham10000")


def _synth(args: argparse.Namespace) -> int:
    import yaml

    from dermcompress.data.synth import make_synthetic

    try:
        planted = None
        if args.planted:
            config = yaml.safe_load(Path(args.planted).read_text()) or {}
            planted = config.get("data", {}).get("synthetic", {}).get("planted")
            if planted is None:
                raise ValueError(f"{args.planted} has no data.synthetic.planted")
        root = make_synthetic(
            Path(args.out), n=args.n, seed=args.seed, as_zip=args.zip, source=args.source, planted=planted
        )
    except (ValueError, TypeError, FileExistsError, OSError) as err:
        raise SystemExit(f"dermcompress synth: {err}") from None
    print(f"synthetic {args.source} layout written to {root}")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from dermcompress.data.fetch import FetchError, fetch

    try:
        outcome = fetch(args.source, args.dest, only=args.only, mirror=args.mirror)
    except FetchError as err:
        raise SystemExit(f"dermcompress fetch: {err}") from None
    downloaded = sum(state == "downloaded" for state in outcome.values())
    print(
        f"{args.source}: {len(outcome)} files verified in {args.dest} ({downloaded} downloaded, "
        f"{len(outcome) - downloaded} already there)"
    )
    if args.source == "isic2019":
        print(f"point the workflow at them: data.isic_root: {Path(args.dest).resolve()}")
    return 0


def _flops(args: argparse.Namespace) -> int:
    import json

    import yaml

    from dermcompress.learn.flops import model_cost

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

    from dermcompress.provenance.lineage import LineageError, format_text, trace

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

    from dermcompress.study.plan import format_plan, make_plan

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


def _export_isic(args: argparse.Namespace) -> int:
    from dermcompress.study.export import run_export

    try:
        counts = run_export(
            args.run,
            args.out,
            ground_truth=args.ground_truth,
            eval_variant=args.eval_variant,
            source=args.source,
        )
    except (ValueError, OSError) as err:
        raise SystemExit(f"dermcompress export-isic: {err}") from None
    print(
        f"{counts['images']} test images of {counts['evaluation']} ({counts['val_rows_left_out']} val rows "
        f"left out), data source {counts['source']}, {counts['format']} format: submission "
        f"{counts['submission']}, ground truth {counts['ground_truth']} "
        f"({', '.join(counts['ground_truth_classes'])}), scorer's copy {counts['scoring']}"
    )
    if counts["ground_truth_classes"] != ["target"]:
        print(f"score: isic-challenge-scoring classification {counts['ground_truth']} {counts['scoring']}")
    else:
        print("score: the AUC of `target` against the ground truth's (ISIC 2020's metric)")
    return 0


def _add_synth(commands: argparse._SubParsersAction) -> None:
    synth = commands.add_parser(
        "synth",
        help="write a synthetic data set in the exact layout of a data source (default ISIC 2019)",
        description="Write a synthetic set in a source's layout: for isic2019 ISIC_2019_Training_Input/ (or "
        ".zip), the ground-truth CSV and the metadata CSV; for isic2020, ham10000 and isic_archive their files "
        "(datasets.py), with patients holding several lesions.",
    )
    synth.add_argument("out", help="folder to write into (created if missing)")
    synth.add_argument("--n", type=int, default=400, help="images listed in the ground truth (default 400)")
    synth.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    synth.add_argument(
        "--zip", action="store_true", help="write the image folders as zips (not for isic_archive)"
    )
    synth.add_argument(
        "--source",
        choices=("isic2019", "isic2020", "ham10000", "isic_archive"),
        default="isic2019",
        help="the layout to write (data.source; default isic2019)",
    )
    synth.add_argument(
        "--planted",
        metavar="CONFIG",
        help="plant the effects that CONFIG's data.synthetic.planted describes (e.g. config.yaml; default none)",
    )
    synth.set_defaults(func=_synth)


def _add_fetch(commands: argparse._SubParsersAction) -> None:
    fetch = commands.add_parser(
        "fetch",
        help="download a source's official files (ISIC 2019, ISIC 2020, HAM10000), checked, into a folder",
        description="Download the official files from their published URLs into DEST, in the layout the "
        "workflow reads (then data.isic_root: DEST). An interrupted download resumes (HTTP Range); each file "
        "gets its name only once its size, the publisher's checksum where one is published and every zip "
        "member's CRC are checked. Files already there are skipped. The workflow itself never downloads: run "
        "this where there is network (a login node often has none), then copy DEST.",
    )
    fetch.add_argument("source", choices=FETCH_SOURCES, help="the data set")
    fetch.add_argument("dest", help="folder to download into (created if missing)")
    fetch.add_argument("--only", nargs="+", metavar="NAME", help="only these files of the source (as saved)")
    fetch.add_argument(
        "--mirror",
        metavar="URL",
        help="download each file from URL/NAME instead of its publisher (an institutional mirror); the "
        "publisher's sizes and checksums still apply",
    )
    fetch.set_defaults(func=_fetch)


def _add_flops(commands: argparse._SubParsersAction) -> None:
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


def _add_lineage(commands: argparse._SubParsersAction) -> None:
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


def _add_plan(commands: argparse._SubParsersAction) -> None:
    plan = commands.add_parser(
        "plan",
        help="what a config costs before it runs: jobs, cluster submissions, image-passes, disk, GPU-hours",
        description="Plan the whole workflow with Snakemake (a dry run with a cluster profile, so jobs are "
        "grouped as they will be submitted) and count trainings, evaluations, feature extractions (as jobs and as "
        "what they write), GPU jobs and submissions, backbone image-passes, disk for weights, checkpoints and "
        "caches, and GPU-hours: of compute, and fixed (each GPU job's start-up and set-up, measured per kind of job "
        "from the `wall time` lines in the folder's results/logs, else assumed), with the share that computes.",
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


def _add_export_isic(commands: argparse._SubParsersAction) -> None:
    export_isic = commands.add_parser(
        "export-isic",
        help="a run's test predictions in its data source's challenge format, and the ground truth to score them",
        description="Write the test split's predictions of an evaluation in the challenge format of its data "
        "source: ISIC 2019's for isic2019 and isic_archive (image, then MEL NV BCC AK BKL DF VASC SCC UNK; "
        "classes the run does not predict are 0.0), ISIC 2018 task 3's for ham10000 (image, then MEL NV BCC "
        "AKIEC BKL DF VASC), ISIC 2020's for isic2020 (image_name,target: the probability of melanoma). Next to "
        "it the test split's ground truth (one-hot over the classes present, the official scorer failing on an "
        "empty class; ISIC 2020: image_name,target) and, for the class formats, OUT_Scoring.csv, the "
        "submission cut to the ground truth's classes: the pair isic-challenge-scoring accepts.",
    )
    export_isic.add_argument(
        "run",
        metavar="RUN",
        help="an evaluation folder (…/eval/<variant>) or a run folder (then its eval/clean)",
    )
    export_isic.add_argument("out", metavar="OUT", help="the submission CSV to write")
    export_isic.add_argument(
        "--ground-truth", help="where the ground truth goes (default: next to OUT, named OUT_GroundTruth.csv)"
    )
    export_isic.add_argument(
        "--eval-variant", help="for a run folder: the evaluation to export (default clean)"
    )
    export_isic.add_argument(
        "--source",
        choices=("isic2019", "isic2020", "ham10000", "isic_archive"),
        help="the run's data source (default: the one its workflow's results/data/manifest.parquet records, "
        "else isic2019)",
    )
    export_isic.set_defaults(func=_export_isic)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dermcompress", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_synth(commands)
    _add_fetch(commands)
    _add_flops(commands)
    _add_lineage(commands)
    _add_plan(commands)
    _add_export_isic(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
