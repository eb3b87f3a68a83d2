"""config.yaml, its schema, and the messages a user gets for a wrong key."""

from __future__ import annotations

import copy

import pytest
import yaml
from conftest import REPO, snakemake, write_config
from snakemake.utils import update_config, validate

from dermcompress import config as dc_config
from dermcompress.learn.pretrain_spec import DEFAULT_SPEC

SCHEMA = REPO / "workflow/schemas/config.schema.yaml"


def load(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


def test_config_and_demo_overlay_are_valid():
    config = load("config.yaml")
    validate(copy.deepcopy(config), str(SCHEMA))
    dc_config.check(config)
    merged = copy.deepcopy(config)
    update_config(merged, load("config.demo.yaml"))  # as Snakemake merges an overlay: mappings key by key
    validate(merged, str(SCHEMA))
    dc_config.check(merged)  # the demo's references too
    # The demo's model pairs are merged into config.yaml's; the pairs of models it does not run stay unused.
    assert merged["experiments"]["domain_pretraining"]["reference"]["model"] == {
        "vit_b16_derm": "vit_b16",
        "dinov2_b14_derm": "dinov2_b14_timm",
        "tiny_vit_derm": "tiny_vit",
    }


def _walk(schema: dict, path: str):
    yield path, schema
    for key, sub in schema.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{key}")
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        yield from _walk(extra, f"{path}.*")


def test_every_schema_key_has_a_description():
    schema = yaml.safe_load(SCHEMA.read_text())
    missing = [path for path, sub in _walk(schema, "config") if not sub.get("description")]
    assert not missing, f"schema keys without a description: {missing}"


def test_every_config_key_is_in_the_schema():
    """The schema forbids unknown keys everywhere; check the config's keys against its properties too."""
    schema = yaml.safe_load(SCHEMA.read_text())
    config = load("config.yaml")
    for section, values in config.items():
        props = schema["properties"][section]
        if isinstance(values, dict) and "properties" in props:
            assert set(values) <= set(props["properties"]), section


@pytest.mark.parametrize(
    ("overlay", "named"),
    [
        ({"data": {"clases": ["MEL", "NV"]}}, "clases"),
        ({"resize": {"resolutions": "224"}}, "resolutions"),
        ({"degrade": {"jpeg_quality": 175}}, "jpeg_quality"),
        ({"degrade": {"blur_kernel_sizes": [3, 4]}}, "degrade.blur_kernel_sizes"),
        (
            {
                "degrade": {
                    "variants": {
                        "clean": {"fractions": {}},
                        "heavy": {"fractions": {"jpeg": 0.8, "blur": 0.5}},
                    }
                }
            },
            "degrade.variants.heavy.fractions",
        ),
        # An experiment's training overrides are checked against the training section's schema.
        (
            {"experiments": {"resolution_sweep": {"training": {"batchsize": 4}}}},
            "config key 'experiments.resolution_sweep.training.batchsize': unknown key",
        ),
        (
            {"experiments": {"label_efficiency": {"training": {"precision": "fp8"}}}},
            "config key 'experiments.label_efficiency.training.precision': 'fp8' is not one of",
        ),
        (
            {"experiments": {"robustness": {"training": {"knn": {"k": 0}}}}},
            "config key 'experiments.robustness.training.knn.k': 0 is less than the minimum of 1",
        ),
        # Seeds name a folder (seed<N>): a negative one is refused by the schema, not by a missing input.
        ({"experiments": {"resolution_sweep": {"seeds": [0, -1]}}}, "-1 is less than the minimum of 0"),
        ({"split": {"seed": -3}}, "-3 is less than the minimum of 0"),
        # A pretraining's keys are the schema's (every one described, defaults DEFAULT_SPEC's).
        (
            {"pretraining": {"derm": {"resolution": 56, "arch": "timm:test_vit", "lrr": 1.0}}},
            "config key 'pretraining.derm.lrr': unknown key",
        ),
    ],
)
def test_a_wrong_key_stops_the_run_before_any_job_and_names_the_key(workflow_dir, overlay, named):
    configfile = write_config(workflow_dir / "bad.yaml", overlay)
    proc = snakemake(workflow_dir, "--dry-run", "--configfile", str(configfile), check=False)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert named in output, output
    assert not (workflow_dir / "results").exists()  # nothing ran


@pytest.mark.parametrize(
    ("overlay", "key", "valid"),
    [
        ({"run_experiment": "all"}, "run_experiment", "the top level of the config has data, split, resize"),
        (
            {"data": {"isic_rot": "/data/isic"}},
            "data.isic_rot",
            "'data' has source, isic_root, extra_metadata",
        ),
        (
            {"experiments": {"vit_lr_sweep": {"lrs": [1.0e-4]}}},
            "experiments.vit_lr_sweep.lrs",
            "'experiments.vit_lr_sweep' has description, models, resolutions",
        ),
    ],
)
def test_an_unknown_key_is_one_line_naming_its_path_and_the_valid_keys(workflow_dir, overlay, key, valid):
    """At any depth, not the whole schema (Snakemake's validate printed 184 to 2,568 lines of it)."""
    configfile = write_config(workflow_dir / "typo.yaml", overlay)
    proc = snakemake(workflow_dir, "--dry-run", "--configfile", str(configfile), check=False)
    assert proc.returncode != 0
    lines = (proc.stdout + proc.stderr).splitlines()
    [message] = [line for line in lines if "config key" in line]
    assert message.startswith(f"config key '{key}': unknown key (did you mean"), message
    assert valid in message
    assert len(lines) < 10, "\n".join(lines)


def test_yaml_alias_bomb_is_refused_quickly_naming_its_key(workflow_dir):
    # Nine levels of nine aliases: 1 kB of YAML, 436 million values once expanded.
    lines = ['lol: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    lines += ["experiments:", "  resolution_sweep:", "    training:", "      lora:", "        targets: *l8"]
    (workflow_dir / "bomb.yaml").write_text("\n".join(lines) + "\n")
    proc = snakemake(workflow_dir, "--dry-run", "--configfile", "bomb.yaml", check=False, timeout=120)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert (
        "config key 'experiments.resolution_sweep.training.lora.targets': expands to 435,848,050 values"
        in output
    )
    assert "alias bomb" in output


def test_config_nodes_counts_aliases_expanded_without_expanding_them():
    shared = [1, 2, 3]
    config = {"a": shared, "b": [shared, shared], "c": {"d": "x"}}
    assert dc_config.config_nodes(config) == 1 + 4 + (1 + 4 + 4) + 2
    dc_config.refuse_alias_bomb(config, limit=16)
    with pytest.raises(dc_config.ConfigError, match="config key 'b': expands to 9 values"):
        dc_config.refuse_alias_bomb(config, limit=8)


def test_variant_settings_carry_only_what_the_variant_uses():
    config = load("config.yaml")
    clean = dc_config.variant_settings(config, "clean")
    degraded = dc_config.variant_settings(config, "degraded")
    assert clean == {"name": "clean", "fractions": {"jpeg": 0.0, "blur": 0.0, "quantize": 0.0}}
    assert degraded["jpeg_quality"] == 75 and degraded["splits"] == ["train"]
    assert degraded["fractions"] == {"jpeg": 0.2, "blur": 0.2, "quantize": 0.2}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda e: e["robustness"].pop("reference"),
            r"'experiments.robustness.reference': missing: name the grid values",
        ),
        (
            lambda e: e["resolution_sweep"].update(reference={"res": 32}),
            r"'experiments.resolution_sweep.reference.res': 32 is not among the grid's \['112', '224', '56'\]",
        ),
        (
            lambda e: e["dinov2_lr_sweep"].update(
                models=["dinov2_b14", "vit_b16"],
                resolutions=[224, 112],
                reference={"res": 112, "model": "vit_b16"},
            ),
            None,
        ),
    ],
)
def test_every_experiment_names_a_reference_in_its_grid(change, message):
    """No reference, or one the grid does not take, is a one-line error naming the key; a reference that names
    a model is a cross-model contrast asked for by name."""
    config = load("config.yaml")
    change(config["experiments"])
    if message is None:
        dc_config.check(config)
        return
    with pytest.raises(dc_config.ConfigError, match=message):
        dc_config.check(config)


def test_a_reference_some_model_never_takes_is_an_error():
    """Rows are compared within their own model: a reference every model must have somewhere in its grid."""
    config = load("config.yaml")
    sweep = config["experiments"]["compression_sweep"]
    dc_config.check(config)
    sweep["reference"] = {
        "train_variant": "jpeg_q30",
        "eval_variant": "clean",
    }  # the arm is evaluated on its own
    with pytest.raises(
        dc_config.ConfigError,
        match=r"'experiments.compression_sweep.reference': no evaluation of \['dinov2_b14', 'vit_b16'\] has all",
    ):
        dc_config.check(config)


def _pairs(pairs: dict, models: list[str] | None = None):
    def change(experiments: dict) -> None:
        experiments["domain_pretraining"]["reference"] = {"model": pairs}
        if models is not None:
            experiments["domain_pretraining"]["models"] = models

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_pairs({"vit_b16_derm": "vit_b16", "dinov2_b14_derm": "dinov2_b14_timm"}), None),
        (
            _pairs({"vit_b16_derm": "vit_b15"}),
            r"'experiments.domain_pretraining.reference.model': \['vit_b15'\] not in models",
        ),
        (
            _pairs({"vit_b16_derm": "vit_b16"}, ["vit_b16_derm", "dinov2_b14_timm"]),
            r"'experiments.domain_pretraining.reference.model.vit_b16_derm': 'vit_b16' is not among the"
            r" experiment's models \['dinov2_b14_timm', 'vit_b16_derm'\]: vit_b16_derm's rows would have no",
        ),
        (
            _pairs({"vit_b16_derm": "vit_b16", "vit_b16": "dinov2_b14_timm"}),
            r"'experiments.domain_pretraining.reference.model.vit_b16': vit_b16 is compared with dinov2_b14_timm"
            r" and is itself the reference of \['vit_b16_derm'\]: a chain",
        ),
        (
            _pairs({"vit_b16_derm_codecs": "vit_b16"}),
            r"'experiments.domain_pretraining.reference.model': none of the compared models"
            r" \['vit_b16_derm_codecs'\] is among the experiment's models",
        ),
        (  # with other reference values: every model's reference model must have the row
            lambda e: e["domain_pretraining"].update(
                reference={"model": {"vit_b16_derm": "vit_b16"}, "mode": "finetune"}
            ),
            None,
        ),
        (
            lambda e: e["domain_pretraining"].update(
                models=["vit_b16_derm", "dinov2_b14_timm", "dinov2_b14_derm"]
            ),
            r"'experiments.domain_pretraining.reference.model.vit_b16_derm': 'vit_b16' is not among",
        ),
        (
            lambda e: e["compression_aware"].update(interaction={"model": "vit_b16"}),
            r"'experiments.compression_aware"
            r".interaction.model': 'vit_b16' is not among the grid's \['vit_b16_derm', 'vit_b16_derm_codecs'\]",
        ),
        (
            lambda e: e["compression_aware"].update(interaction={"eval_variant": "jpeg_q30"}),
            r"'experiments.compression_aware.interaction.eval_variant': the reference names eval_variant too",
        ),
        (
            lambda e: e["compression_aware"].update(interaction={"seed": 0}),
            r"'experiments.compression_aware.interaction.seed': not a grid field",
        ),
    ],
)
def test_models_paired_by_name_and_an_interaction_are_checked_naming_the_key(change, message):
    """`reference: {model: {compared: reference}}` pairs models by name: unknown models, a reference model the
    grid does not run, a chain, or no pair the grid uses are one-line errors naming the key; an `interaction`
    names grid values the reference leaves to each row."""
    config = load("config.yaml")
    change(config["experiments"])
    if message is None:
        dc_config.check(config)
        return
    with pytest.raises(dc_config.ConfigError, match=message):
        dc_config.check(config)


def test_pretraining_schema_defaults_are_default_spec():
    """One source of truth: every key of a `pretraining:` entry but its resolution is a key of learn/pretrain_spec.py's
    DEFAULT_SPEC, with DEFAULT_SPEC's value as the schema's default (nested sections key by key)."""
    entry = yaml.safe_load(SCHEMA.read_text())["properties"]["pretraining"]["additionalProperties"]
    props = entry["properties"]
    assert set(props) == {*DEFAULT_SPEC, "resolution"} and entry["required"] == ["resolution"]
    for key, value in DEFAULT_SPEC.items():
        assert props[key]["default"] == value, key
        if isinstance(value, dict):
            assert set(props[key]["properties"]) == set(value), key


PRETRAINING = {"derm": {"resolution": 56, "init": "scratch", "arch": "timm:test_vit"}}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["pretraining"]["derm"].update(steps=0), "'pretraining.derm.steps': must be >= 1"),
        (lambda c: c["pretraining"]["derm"].update(arch=None), "'pretraining.derm.arch': required"),
        (lambda c: c["pretraining"]["derm"].update(init="vit_b17", arch=None), "'pretraining.derm.init'"),
        (
            lambda c: c["pretraining"]["derm"].update(init="dinov2_b14", arch=None),
            "'pretraining.derm.init'.*timm:vit_base_patch14_dinov2.lvd142m",
        ),
        (lambda c: c["pretraining"]["derm"].update(resolution=57), "'pretraining.derm.resolution'"),
        (lambda c: c["pretraining"]["derm"].update(variants=["jpeg_q31"]), "'pretraining.derm.variants'"),
        (  # jpeg_q95 caches val and test only
            lambda c: c["pretraining"]["derm"].update(variants=["clean", "jpeg_q95"]),
            "'pretraining.derm.variants': 'jpeg_q95' caches no train split",
        ),
        (
            lambda c: c["models"].update(derm={"source": "pretrain:dino"}),
            "'models.derm.source': no pretraining named 'dino'",
        ),
        (
            lambda c: c["models"].update(derm={"source": "pretrain:derm", "arch": "timm:resnet50"}),
            "'models.derm.arch'",
        ),
        (lambda c: c["models"].update(derm={"source": "pretrain:derm"}), None),
    ],
)
def test_a_wrong_pretraining_names_its_key(change, message):
    """Unknown keys and bad values name the key; so do an init no model or not timm, an uncached resolution, a
    variant that does not exist or caches no train split, and a pretrain: model naming no pretraining."""
    config = load("config.yaml")
    config["pretraining"].update(copy.deepcopy(PRETRAINING))
    config["models"]["derm_vit"] = {
        "source": "pretrain:derm"
    }  # checked against the config: an experiment loads it
    config["experiments"]["frozen_vs_finetuned"]["models"].append("derm_vit")
    change(config)
    if message is None:
        dc_config.check(config)
        return
    with pytest.raises(dc_config.ConfigError, match=message):
        dc_config.check(config)


def test_a_pretraining_no_selected_experiment_loads_is_checked_only_for_its_own_keys():
    """A config that replaces the experiments or the resolutions (the demo and the tests do) leaves config.yaml's
    pretrainings inert: they never run, and their inits and resolutions are not held against the new config;
    their own keys still are."""
    config = load("config.yaml")
    config["resize"]["resolutions"] = [32]
    sweep = config["experiments"]["resolution_sweep"]
    config["experiments"] = {"resolution_sweep": {**sweep, "resolutions": [32], "reference": {"res": 32}}}
    dc_config.check(config)  # vit_b16_dino, at 224 px, is not held against resize.resolutions
    config["pretraining"]["vit_b16_dino"]["steps"] = 0
    with pytest.raises(dc_config.ConfigError, match=r"'pretraining\.vit_b16_dino\.steps'"):
        dc_config.check(config)
