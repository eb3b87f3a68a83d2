"""Checks of config.yaml that a JSON schema cannot express, and the settings each rule receives.

The schema (workflow/schemas/config.schema.yaml) catches unknown keys and wrong types; `check` catches the
rest (fractions that overlap, even blur kernels, reversed ranges) and names the offending key.
"""

from __future__ import annotations

from typing import Any

from dermcompress import experiments

DEGRADATIONS = ("jpeg", "blur", "quantize")
DEFAULT_DEGRADED_SPLITS = ("train",)


class ConfigError(ValueError):
    """A config value that is well-typed but unusable; the message starts with the key's dotted path."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config key '{key}': {problem}")
        self.key = key


def check(config: dict[str, Any]) -> None:
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
    if config["degrade"]["variants"]["clean"].get("fractions"):
        raise ConfigError(
            "degrade.variants.clean.fractions", "the clean variant must have no degradation ({})"
        )
    if problems := experiments.check_experiments(config):
        key, _, problem = problems[0].partition(": ")
        raise ConfigError(key, problem)
    split = config["split"]
    if split["test_fraction"] + split["val_fraction"] >= 1:
        raise ConfigError("split.val_fraction", "test_fraction + val_fraction must leave images for training")


def variant_settings(config: dict[str, Any], name: str) -> dict[str, Any]:
    """Everything the degrade stage needs for one variant (and nothing else, so unrelated edits rerun nothing)."""
    degrade = config["degrade"]
    variant = degrade["variants"][name]
    fractions = {op: float(variant.get("fractions", {}).get(op, 0.0)) for op in DEGRADATIONS}
    settings: dict[str, Any] = {"name": name, "fractions": fractions}
    if any(fractions.values()):
        settings["seed"] = degrade["seed"]
        settings["splits"] = list(variant.get("splits", DEFAULT_DEGRADED_SPLITS))
    if fractions["jpeg"]:
        settings["jpeg_quality"] = degrade["jpeg_quality"]
    if fractions["blur"]:
        settings["blur_kernel_sizes"] = list(degrade["blur_kernel_sizes"])
        settings["blur_sigma"] = list(degrade["blur_sigma"])
    if fractions["quantize"]:
        settings["quantize_colors"] = list(degrade["quantize_colors"])
        settings["quantize_method"] = degrade["quantize_method"]
    return settings
