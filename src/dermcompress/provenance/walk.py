"""The walk from a result's record upstream, record by record, to the raw files; and the images behind a result
(the ids each split of a cache, a training or an evaluation holds).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from dermcompress.data.cache import INFO

from .hashes import info_hashes, within
from .records import LineageError, find_record, is_temporary, output_of, read_record, workdir_of

# ---------------------------------------------------------------------------------------------------- the walk

# An evaluation job that scores a run on several eval variants names its per-variant files by role and variant:
# outputs predictions_<variant> and metrics_<variant>, inputs cache_<variant> (from pixels) or
# eval_val_<variant> and eval_test_<variant> (probes, from features).
PER_VARIANT = "predictions_"
VARIANT_INPUTS = ("cache_", "eval_val_", "eval_test_")


@dataclass
class Node:
    """One job met on the walk: its record, where the record lies, and the folder its relative paths start from."""

    record: dict[str, Any]
    file: Path
    root: Path

    @classmethod
    def load(cls, file: Path) -> Node:
        """The record in `file`; its relative paths start where the recorded output path says (else in the
        workflow folder the record lies in)."""
        record = read_record(file)
        written = output_of(file)
        recorded = next(
            (Path(o["path"]) for o in record["outputs"] if Path(o["path"]).name == written.name), None
        )
        if recorded is None or recorded.is_absolute():
            return cls(record, file, workdir_of(written))
        root = written.absolute()
        for _ in recorded.parts:
            root = root.parent
        return cls(record, file, root)

    @property
    def written(self) -> Path:
        """The output the record is the record of (the record itself lies in the store, or beside it)."""
        return output_of(self.file)

    def resolve(self, path: str) -> Path:
        return self.root / path

    @property
    def key(self) -> tuple[str, str]:
        """What the node stands for: its job and, for a job that scored a run on several eval variants, the one
        of its evaluations the record is of (each is a result of its own, with inputs of its own)."""
        return self.record["job"], self.variant or ""

    @property
    def variant(self) -> str | None:
        """The eval variant the record is of, when its job wrote one set of per-variant outputs per variant
        (`predictions_<variant>`, `metrics_<variant>`); else None."""
        for entry in self.record["outputs"]:
            name, path = entry["name"], self.resolve(entry["path"])
            if name.startswith(PER_VARIANT) and path.parent == self.written.parent.absolute():
                return name.removeprefix(PER_VARIANT)
        return None

    def reads(self, entry: dict[str, Any]) -> bool:
        """Whether the result the record is of read this input: not another eval variant's cache or features
        (inputs named `<role>_<variant>` in an evaluation job of several variants)."""
        variant = self.variant
        if variant is None:
            return True
        scored = [
            entry["name"].removeprefix(role) for role in VARIANT_INPUTS if entry["name"].startswith(role)
        ]
        return not scored or variant in scored

    @property
    def label(self) -> str:
        wildcards = ", ".join(f"{k}={v}" for k, v in self.record["wildcards"].items())
        return f"{self.record['rule']}[{wildcards}]" if wildcards else self.record["rule"]


@dataclass
class Walk:
    nodes: list[Node] = field(default_factory=list)
    # Inputs no job of the workflow wrote (raw files; `external` when outside the workflow folder), by path.
    raw: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Links the walk could not follow: a malformed record, an output of the workflow with no record.
    problems: list[dict[str, Any]] = field(default_factory=list)


def walk(starts: list[Path], follow=lambda node, entry: True, workdir: Path | None = None) -> Walk:
    """Every job upstream of the given records, nearest first; `follow(node, input)` may prune inputs.

    The walk stays inside `workdir` (default: the workflow folder of the first record): an input outside it is
    an external raw file, whose folder is never searched for records. An input under its `results/` folder was
    written by a job of the workflow, so a missing or malformed record there is a problem, not a raw file.
    """
    result, seen_jobs, seen_files = Walk(), set(), set()
    workdir = Path(os.path.realpath(workdir or workdir_of(starts[0])))
    todo = []

    def load(file: Path, wanted_by: str) -> None:
        try:
            todo.append(Node.load(file))
        except LineageError as err:
            result.problems.append(
                {"path": str(file), "problem": f"malformed record ({err})", "by": wanted_by}
            )

    for file in starts:
        load(file, "the result asked for")
    while todo:
        node = todo.pop(0)
        if node.key in seen_jobs:
            continue
        seen_jobs.add(node.key)
        result.nodes.append(node)
        for entry in node.record["inputs"]:
            if not node.reads(entry) or not follow(node, entry):
                continue
            path = node.resolve(entry["path"])
            external = not within(path, workdir)
            producer = None if external else find_record(path, workdir)
            if producer is None and is_temporary(path) and not os.path.lexists(path):
                continue  # a temporary output, deleted after use with its record: the checks list it as removed
            if producer is None and not external and within(path, workdir / "results"):
                result.problems.append(
                    {
                        "path": str(path),
                        "problem": "missing upstream record: an output of the workflow that no job's record vouches for",
                        "by": f"{node.label} (input {entry['name']})",
                    }
                )
            elif producer is None:
                raw = result.raw.setdefault(
                    str(path), {**entry, "path": str(path), "external": external, "read_by": []}
                )
                raw["read_by"].append(node.label)
            elif producer not in seen_files:
                seen_files.add(producer)
                load(producer, f"{node.label} (input {entry['name']})")
    return result


# ---------------------------------------------------------------------------------------------------- images


@cache  # a cache's shards are read once per walk, however many runs share it
def ids_by_split(path: Path, workdir: Path) -> dict[str, frozenset[str]]:
    """Image ids per split in a cache folder, a cache shard or any parquet table with an image_id column
    inside `workdir` (none from a file that cannot be read: the checks report it)."""
    import pyarrow.parquet as pq

    if not within(path, workdir):
        return {}
    if path.is_dir() and (path / INFO).is_file():
        return merge_ids([ids_by_split(path / rel, workdir) for rel in info_hashes(path)])
    if path.suffix != ".parquet" or not path.is_file():
        return {}
    try:
        columns = [c for c in ("image_id", "split") if c in pq.read_schema(path).names]
        table = pq.read_table(path, columns=columns).to_pydict() if "image_id" in columns else {}
    except (OSError, ValueError):  # a damaged file (pyarrow's errors derive from these)
        return {}
    if not table:
        return {}
    splits = table.get("split", ["all"] * len(table["image_id"]))
    found: dict[str, set[str]] = {}
    for image_id, split in zip(table["image_id"], splits, strict=True):
        found.setdefault(str(split), set()).add(str(image_id))
    return {split: frozenset(ids) for split, ids in found.items()}


def _role(node: Node, name: str, kind: str = "inputs") -> Path | None:
    """The path a record names under `name` among its inputs (or outputs), if any."""
    return next((node.resolve(e["path"]) for e in node.record[kind] if e["name"] == name), None)


def _writer(found: Walk, path: Path | None) -> Node | None:
    """The walked job that wrote `path`."""
    for node in found.nodes:
        if path is not None and any(node.resolve(e["path"]) == path for e in node.record["outputs"]):
            return node
    return None


def _train_images(node: Node | None, workdir: Path) -> frozenset[str]:
    """The images a training saw: the train split of a finetune's cache, or of a probe's train features."""
    if node is None:
        return frozenset()
    if (cache := _role(node, "cache")) is not None:
        return ids_by_split(cache, workdir).get("train", frozenset())
    if (features := _role(node, "train")) is not None:
        return frozenset().union(*ids_by_split(features, workdir).values())
    return frozenset()


def _scored(node: Node) -> Path | None:
    """The predictions of the evaluation a record is of (output `predictions`, or `predictions_<variant>`)."""
    variant = node.variant
    return _role(node, "predictions" if variant is None else PER_VARIANT + variant, "outputs")


def run_images(node: Node, found: Walk, workdir: Path) -> dict[str, frozenset[str]]:
    """An evaluation's images: those its model trained on, and the val and test images it was scored on."""
    used = {s: ids for s, ids in ids_by_split(_scored(node), workdir).items()}
    if (bank := _role(node, "bank")) is not None:  # kNN: the train features are its model
        train = frozenset().union(*ids_by_split(bank, workdir).values())
    else:
        train = _train_images(_writer(found, _role(node, "weights") or _role(node, "head")), workdir)
    return {s: ids for s, ids in {"train": train, **used}.items() if ids and s != "all"}


def is_run(node: Node) -> bool:
    """An evaluation of a run (rules evaluate__*, evaluate_probe__*): what a table row and a run folder stand
    for."""
    return _scored(node) is not None


def merge_ids(parts: list[dict[str, frozenset[str]]]) -> dict[str, frozenset[str]]:
    merged: dict[str, frozenset[str]] = {}
    for part in parts:
        for split, ids in part.items():
            merged[split] = merged.get(split, frozenset()) | ids
    return merged


def manifest_of(nodes: list[Node], workdir: Path) -> tuple[Any, Path | None]:
    """The ingest manifest met on the walk (pandas frame indexed by image_id) and the raw image source it read."""
    import pandas as pd

    for node in nodes:
        outputs = {o["name"]: o["path"] for o in node.record["outputs"]}
        inputs = {i["name"]: i["path"] for i in node.record["inputs"]}
        manifest = node.resolve(outputs["manifest"]) if "manifest" in outputs else None
        if manifest and "images" in inputs and within(manifest, workdir) and manifest.is_file():
            try:
                frame = pd.read_parquet(manifest, columns=["image_id", "sha256", "member"])
            except (OSError, ValueError, KeyError):  # damaged: its own hash check reports it
                return None, None
            # Several image folders or zips (HAM10000's two parts): the folder that holds them.
            parts = [node.resolve(i["path"]) for i in node.record["inputs"] if i["name"] == "images"]
            source = parts[0] if len(parts) == 1 else Path(os.path.commonpath(parts))
            return frame.set_index("image_id"), source
    return None, None
