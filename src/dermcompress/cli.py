"""The `dermcompress` command: what users do outside Snakemake."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _synth(args: argparse.Namespace) -> int:
    from dermcompress.synth import make_synthetic

    root = make_synthetic(Path(args.out), n=args.n, seed=args.seed, as_zip=args.zip)
    print(f"synthetic ISIC 2019 layout written to {root}")
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
    synth.add_argument("--zip", action="store_true", help="write ISIC_2019_Training_Input.zip instead of a folder")
    synth.set_defaults(func=_synth)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
