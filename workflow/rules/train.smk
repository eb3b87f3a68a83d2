# The run layer (src/dermcompress/learn/runs.py): each distinct training once, evaluated once per eval variant.
#   train -> weights (temporary) -> evaluate        finetune, freeze_blocks, lora: one cluster job per training
#   features (once per model x resolution x variant x split) -> linear -> evaluate_probe   linear probes
#   features -> evaluate_probe                                                            knn


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


rule evaluate:
    input:
        weights=f"{RUN_DIR}/weights.safetensors",
        summary=f"{RUN_DIR}/train.json",
        cache="results/cache/{res}px/{eval_variant}",
        splits="results/data/splits.parquet",
    output:
        predictions=f"{EVAL_DIR}/predictions.parquet",
        metrics=f"{EVAL_DIR}/metrics.json",
    log:
        f"results/logs/runs/{RUN_ID}/evaluate_{{eval_variant}}.log",
    benchmark:
        f"results/benchmarks/runs/{RUN_ID}/evaluate_{{eval_variant}}.tsv"
    wildcard_constraints:
        mode="finetune|freeze_blocks|lora",
    group:
        get_run_group
    conda:
        "../../envs/torch.yaml"
    resources:
        gpu=1,
    params:
        model=get_model_entry,
        settings=get_run_settings,
        code=get_code("learn.evaluate"),
    script:
        "../../scripts/evaluate.py"


rule features:
    input:
        cache="results/cache/{res}px/{variant}",
        weights=get_local_weights,
    output:
        FEATURES,
    log:
        "results/logs/features/{model}/{res}px/{variant}/{init}/{split}.log",
    benchmark:
        "results/benchmarks/features/{model}/{res}px/{variant}/{init}/{split}.tsv"
    # Short GPU jobs: a cluster profile packs several into one submission (group-components), one after another
    # on one GPU (the profile's gpu_slot).
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


rule evaluate_probe:
    input:
        unpack(get_probe_inputs),
    output:
        predictions=f"{EVAL_DIR}/predictions.parquet",
        metrics=f"{EVAL_DIR}/metrics.json",
    log:
        f"results/logs/runs/{RUN_ID}/evaluate_{{eval_variant}}.log",
    wildcard_constraints:
        mode="linear|knn",
    group:
        "probes"
    conda:
        "../../envs/torch.yaml"
    params:
        settings=get_run_settings,
        code=get_code("learn.probes"),
    script:
        "../../scripts/evaluate_probe.py"
