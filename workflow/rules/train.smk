# The run layer (src/dermcompress/learn/runs.py): each distinct training once, evaluated by one job on all its
# eval variants.
#   train -> weights (temporary) -> evaluate        finetune, freeze_blocks, lora: one cluster job per training
#   features (once per model x resolution x variant x init) -> linear -> evaluate_probe   linear probes
#   features -> evaluate_probe                                                           knn


rule train:
    input:
        cache="results/cache/{res}px/{train_variant}",
        # Groups of the train split, for label-fraction runs (subsample.py).
        splits="results/data/splits.parquet",
        weights=get_local_weights,
    output:
        weights=get_weights_output(f"{RUN_DIR}/weights.safetensors"),
        history=f"{RUN_DIR}/history.csv",
        config=f"{RUN_DIR}/config.json",
        summary=f"{RUN_DIR}/train.json",
    log:
        f"results/logs/runs/{RUN_ID}/train.log",
    benchmark:
        f"results/benchmarks/runs/{RUN_ID}/train.tsv"
    wildcard_constraints:
        mode="finetune|freeze_blocks|lora",
    group:
        get_run_group
    conda:
        "../../envs/torch.yaml"
    resources:
        # GPUs for this run: N > 1 trains on N ranks under torchrun. The profiles map it (SLURM --gpus, a local
        # pool) and raise it per experiment; no cluster facts here.
        gpu=1,
    params:
        model=get_model_entry,
        settings=get_run_settings,
        # Outside the declared outputs: Snakemake must not delete it when an attempt fails or is preempted.
        checkpoint_dir=CHECKPOINT_DIR,
        code=get_code("learn.train"),
    script:
        "../../scripts/train.py"


# One job per run scores its final model on every eval variant the experiments ask of it: the model is loaded once,
# each cache streamed once. A rule's outputs are fixed, so there is one rule per set of eval variants, each
# constrained to the runs ({run}: the folder below results/runs/) it evaluates.
inherit_profile_settings(
    "evaluate", [rule_name("evaluate", variants) for variants in TRAINED_EVALUATIONS]
)


for variants, selected in TRAINED_EVALUATIONS.items():

    rule:
        name:
            rule_name("evaluate", variants)
        input:
            unpack(get_evaluation_inputs(variants)),
        output:
            **evaluation_outputs(variants),
        log:
            "results/logs/runs/{run}/evaluate.log",
        benchmark:
            "results/benchmarks/runs/{run}/evaluate.tsv"
        wildcard_constraints:
            run=one_of(run_ids(selected)),
        group:
            get_run_group
        conda:
            "../../envs/torch.yaml"
        resources:
            gpu=1,
        params:
            model=get_model_entry,
            settings=get_run_settings,
            variants=list(variants),
            code=get_code("learn.evaluate"),
        script:
            "../../scripts/evaluate.py"


# Frozen features: one job per backbone input (model x resolution x variant x init) writes every split the probes
# read, the backbone built once; one rule per set of splits.
inherit_profile_settings(
    "features", [rule_name("features", splits) for splits in FEATURE_JOBS]
)


for splits, folders in FEATURE_JOBS.items():

    rule:
        name:
            rule_name("features", splits)
        input:
            cache=get_features_cache,
            weights=get_local_weights,
        output:
            **feature_outputs(splits),
        log:
            "results/logs/features/{features}.log",
        benchmark:
            "results/benchmarks/features/{features}.tsv"
        wildcard_constraints:
            features=one_of(f.removeprefix("results/features/") for f in folders),
        # Short GPU jobs: a cluster profile packs several into one submission (group-components), one after
        # another on one GPU (the profile's gpu_slot).
        group:
            "features"
        conda:
            "../../envs/torch.yaml"
        resources:
            gpu=1,
        params:
            model=get_model_entry,
            settings=config["training"],
            seed=get_features_seed,
            splits=list(splits),
            code=get_code("learn.features"),
        script:
            "../../scripts/features.py"


rule linear:
    input:
        train=get_probe_features("train"),
        val=get_probe_features("val"),
        splits="results/data/splits.parquet",
    output:
        head=f"{RUN_DIR}/head.safetensors",
        probe=f"{RUN_DIR}/probe.csv",
        history=f"{RUN_DIR}/history.csv",
        config=f"{RUN_DIR}/config.json",
        summary=f"{RUN_DIR}/train.json",
    log:
        f"results/logs/runs/{RUN_ID}/linear.log",
    wildcard_constraints:
        mode="linear",
    group:
        "probes"
    conda:
        "../../envs/torch.yaml"
    params:
        settings=get_run_settings,
        code=get_code("learn.probes"),
    script:
        "../../scripts/linear.py"


inherit_profile_settings(
    "evaluate_probe",
    [rule_name("evaluate_probe", variants) for variants in PROBE_EVALUATIONS],
)


for variants, selected in PROBE_EVALUATIONS.items():

    rule:
        name:
            rule_name("evaluate_probe", variants)
        input:
            unpack(get_probe_inputs(variants)),
        output:
            **evaluation_outputs(variants),
        log:
            "results/logs/runs/{run}/evaluate.log",
        wildcard_constraints:
            run=one_of(run_ids(selected)),
        group:
            "probes"
        conda:
            "../../envs/torch.yaml"
        params:
            settings=get_run_settings,
            variants=list(variants),
            code=get_code("learn.probes"),
        script:
            "../../scripts/evaluate_probe.py"
