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
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
