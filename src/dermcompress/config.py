"""Checks of config.yaml that a JSON schema cannot express, and the settings each rule receives.

The schema (workflow/schemas/config.schema.yaml) catches unknown keys and wrong types; `check` catches the
rest (fractions that overlap, even blur kernels, reversed ranges, experiments' `training:` overrides checked
against the schema of the training section) and names the offending key. `refuse_alias_bomb` runs before
validation: a YAML alias bomb would hang it. `schema_errors_in_one_line` makes a schema error one line, as every
error here is: the key's dotted path, what is wrong and, for an unknown key, the valid ones (Snakemake's
`validate` prints the whole schema, thousands of lines for a top-level key).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path
from typing import Any

from dermcompress.data import codec
from dermcompress.data.degrade import DEGRADATIONS
from dermcompress.errors import ConfigError
from dermcompress.learn import pretrain_spec
from dermcompress.study import experiments

__all__ = ["ConfigError", "check", "refuse_alias_bomb", "schema_errors_in_one_line", "variant_settings"]
DEFAULT_DEGRADED_SPLITS = ("train",)
# Far more than any real config (config.yaml has ~500); a YAML alias bomb of a few lines has billions.
MAX_CONFIG_NODES = 1_000_000
# A schema message quotes the offending value: a long list or a whole section is cut to this many characters.
MAX_MESSAGE = 200


def config_nodes(value: Any, _memo: dict[int, int] | None = None) -> int:
    """Nodes of a config (mappings, lists and scalars) once YAML aliases are expanded.

    YAML aliases make the loaded config a graph whose shared parts count once per reference; counting each
    distinct object once (memoised by identity) makes the count cost the size of the file, not of its expansion.
    """
    memo = {} if _memo is None else _memo
    if id(value) in memo:
        return memo[id(value)]
    if isinstance(value, dict):
        size = 1 + sum(config_nodes(v, memo) for v in value.values())
    elif isinstance(value, list | tuple):
        size = 1 + sum(config_nodes(v, memo) for v in value)
    else:
        size = 1
    memo[id(value)] = size
    return size


def refuse_alias_bomb(config: dict[str, Any], limit: int = MAX_CONFIG_NODES) -> None:
    """Stop on a config that expands to more than `limit` nodes, naming the key that holds them.

    Validation would otherwise walk and, on an error, print every expanded node: hours for a 1 kB file.
    """
    memo: dict[int, int] = {}
    if config_nodes(config, memo) <= limit:
        return
    path, node = [], config
    while isinstance(node, dict) and (big := [k for k, v in node.items() if config_nodes(v, memo) > limit]):
        key = max(big, key=lambda k: config_nodes(node[k], memo))
        path.append(str(key))
        node = node[key]
    raise ConfigError(
        ".".join(path) or "(top level)",
        f"expands to {config_nodes(node, memo):,} values once its YAML aliases (*name) are expanded, more than "
        f"the {limit:,} a config may have: an alias bomb? Write the values out instead.",
    )


def schema_error(err, prefix: tuple[str, ...] = ()) -> ConfigError:
    """A jsonschema ValidationError as one line: the dotted path of the key (below `prefix`), what is wrong, and
    for an unknown key the keys valid there (and the closest one)."""
    import jsonschema

    # Of a oneOf's failures, the one that fits the value ("0 is less than the minimum of 1").
    err = jsonschema.exceptions.best_match([err])
    path = [*prefix, *map(str, err.absolute_path)]
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        valid = list(err.schema.get("properties", {}))
        unknown = sorted(set(err.instance) - set(valid))
        where = f"'{'.'.join(path)}'" if path else "the top level of the config"
        close = difflib.get_close_matches(unknown[0], valid, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        also = f"; also unknown: {', '.join(unknown[1:])}" if unknown[1:] else ""
        return ConfigError(
            ".".join([*path, unknown[0]]), f"unknown key{hint}; {where} has {', '.join(valid)}{also}"
        )
    message = " ".join(err.message.split())
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 1] + "…"
    return ConfigError(".".join(path) or "(top level)", message)


@contextmanager
def schema_errors_in_one_line() -> Iterator[None]:
    """Around snakemake.utils.validate (which also fills in the schema's defaults): its error, which prints the
    whole schema of the section at fault, raised as one line (schema_error)."""
    import jsonschema

    try:
        yield
    except Exception as err:
        found = err.__context__ if not isinstance(err, jsonschema.ValidationError) else err
        if not isinstance(found, jsonschema.ValidationError):
            raise
        raise schema_error(found) from None


def check_training_overrides(config: dict[str, Any], training_schema: dict[str, Any]) -> None:
    """Each experiment's `training:` overrides against the schema of the training section (none required)."""
    import jsonschema

    schema = {k: v for k, v in training_schema.items() if k != "required"}
    validator = jsonschema.Draft202012Validator(schema)
    for name, grid in config["experiments"].items():
        overrides = grid.get("training") or {}
        for err in sorted(validator.iter_errors(overrides), key=lambda e: [str(p) for p in e.path]):
            raise schema_error(err, prefix=("experiments", name, "training"))


def check(config: dict[str, Any], schema: str | Path | dict[str, Any] | None = None) -> None:
    """Everything the schema cannot say; with the schema (its file or dict), the experiments' overrides too."""
    degrade = config["degrade"]
    for k in degrade["blur_kernel_sizes"]:
        if k % 2 == 0:
            raise ConfigError("degrade.blur_kernel_sizes", f"Gaussian kernel sizes must be odd, got {k}")
    for key in ("blur_sigma", "quantize_colors"):
        low, high = degrade[key]
        if low > high:
            raise ConfigError(f"degrade.{key}", f"[low, high] expected, got [{low}, {high}]")
    for name, variant in degrade["variants"].items():
        total = sum(variant.get("fractions", {}).values())
        if total > 1 + 1e-9:
            raise ConfigError(
                f"degrade.variants.{name}.fractions",
                f"the degradations are disjoint shares of the images, so they must sum to at most 1 (got {total:g})",
            )
    for name, variant in degrade["variants"].items():
        if "codec" in variant:
            try:
                codec.codec_settings(variant["codec"])
            except ValueError as err:
                raise ConfigError(f"degrade.variants.{name}.codec", str(err)) from None
    clean = config["degrade"]["variants"]["clean"]
    if clean.get("fractions"):
        raise ConfigError(
            "degrade.variants.clean.fractions", "the clean variant must have no degradation ({})"
        )
    if "codec" in clean:
        raise ConfigError(
            "degrade.variants.clean.codec", "the clean variant is the resized pixels, sent as they are"
        )
    if problems := experiments.check_experiments(config):
        key, _, problem = problems[0].partition(": ")
        raise ConfigError(key, problem)
    check_pretraining(config)
    split = config["split"]
    if split["test_fraction"] + split["val_fraction"] >= 1:
        raise ConfigError("split.val_fraction", "test_fraction + val_fraction must leave images for training")
    bands = config.get("subgroups", {}).get("age_bands", [])
    if any(b <= a for a, b in pairwise(bands)):
        raise ConfigError("subgroups.age_bands", f"ages that cut bands must increase, got {bands}")
    if schema is not None:
        if not isinstance(schema, dict):
            import yaml

            schema = yaml.safe_load(Path(schema).read_text())
        check_training_overrides(config, schema["properties"]["training"])


def check_pretraining(config: dict[str, Any]) -> None:
    """Each `pretraining:` entry resolved against DEFAULT_SPEC (unknown keys, bad values); each that runs (a
    selected experiment's model loads it), against the rest of the config too: its init model, its resolution
    and variants (each must cache the train split). One that none loads never runs, so an overlay that changes
    `models:` or `resize:` (the demo's, the tests') leaves config.yaml's pretrainings inert. Every `pretrain:`
    model must name one."""
    pretraining = config.get("pretraining") or {}
    models = config["models"]
    selected = [config["experiments"][name] for name in experiments.selected_experiments(config)]
    used = {
        pretrain_spec.pretrained_from(models[m]) for grid in selected for m in grid["models"] if m in models
    }
    for name, entry in pretraining.items():
        where = f"pretraining.{name}"
        spec = pretraining_spec(config, name)
        pretrain_spec.resolve_spec(spec, name)
        if name not in used:
            continue
        pretrain_spec.init_arch(name, spec, models)
        if entry["resolution"] not in config["resize"]["resolutions"]:
            raise ConfigError(
                f"{where}.resolution",
                f"{entry['resolution']} px is not cached; resize.resolutions: {config['resize']['resolutions']}",
            )
        for variant in spec.get("variants", pretrain_spec.DEFAULT_SPEC["variants"]):
            if variant not in config["degrade"]["variants"]:
                raise ConfigError(
                    f"{where}.variants",
                    f"unknown variant {variant!r}; degrade.variants has {sorted(config['degrade']['variants'])}",
                )
            if "train" not in variant_settings(config, variant).get("splits", ["train"]):
                raise ConfigError(
                    f"{where}.variants",
                    f"{variant!r} caches no train split: give pretraining a variant of its own with "
                    "splits: [train] (adding train to a variant others read would rebuild their caches)",
                )
    for model, entry in models.items():
        name = pretrain_spec.pretrained_from(entry)
        if name is None:
            continue
        if "arch" in entry or entry.get("pretrained", True) is not True:
            key = "arch" if "arch" in entry else "pretrained"
            raise ConfigError(
                f"models.{model}.{key}",
                "a pretrain: source is its pretraining's weights, in its init's architecture",
            )
        if name not in pretraining:
            raise ConfigError(
                f"models.{model}.source", f"no pretraining named {name!r}; known: {sorted(pretraining)}"
            )
        if name in used:
            pretrain_spec.pretrained_entry(model, models, pretraining)


def pretraining_spec(config: dict[str, Any], name: str) -> dict[str, Any]:
    """A `pretraining:` entry as run_pretraining reads it: without the workflow's keys (its resolution)."""
    return pretrain_spec.spec_of(config["pretraining"][name])


def variant_settings(config: dict[str, Any], name: str) -> dict[str, Any]:
    """Everything the degrade stage needs for one variant (and nothing else, so unrelated edits rerun nothing)."""
    degrade = config["degrade"]
    variant = degrade["variants"][name]
    fractions = {op: float(variant.get("fractions", {}).get(op, 0.0)) for op in DEGRADATIONS}
    settings: dict[str, Any] = {"name": name, "fractions": fractions}
    if any(fractions.values()):
        settings["seed"] = degrade["seed"]
    if any(fractions.values()) or "codec" in variant:
        settings["splits"] = list(variant.get("splits", DEFAULT_DEGRADED_SPLITS))
    if "codec" in variant:
        settings["codec"] = codec.codec_settings(variant["codec"])
    if fractions["jpeg"]:
        settings["jpeg_quality"] = degrade["jpeg_quality"]
    if fractions["blur"]:
        settings["blur_kernel_sizes"] = list(degrade["blur_kernel_sizes"])
        settings["blur_sigma"] = list(degrade["blur_sigma"])
    if fractions["quantize"]:
        settings["quantize_colors"] = list(degrade["quantize_colors"])
        settings["quantize_method"] = degrade["quantize_method"]
    return settings
