# One training run and its evaluation: model x resolution x train/eval variant x mode x lr x seed.


rule train:
    input:
        train_cache="results/cache/{res}px/{train_variant}",
        eval_cache="results/cache/{res}px/{eval_variant}",
        # Groups of the train split, for label-fraction runs (subsample.py).
        splits="results/data/splits.parquet",
        weights=get_local_weights,
    output:
        metrics=f"{RUN_DIR}/metrics.json",
        predictions=f"{RUN_DIR}/predictions.parquet",
        history=f"{RUN_DIR}/history.csv",
        config=f"{RUN_DIR}/config.json",
        weights=f"{RUN_DIR}/weights.safetensors",
    log:
        f"results/logs/runs/{RUN_ID}.log",
    benchmark:
        f"results/benchmarks/runs/{RUN_ID}.tsv"
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
        code=get_code("train"),
    script:
        "../../scripts/train.py"
