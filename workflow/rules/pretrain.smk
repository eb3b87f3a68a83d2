# Domain self-supervised pretraining (src/dermcompress/learn/pretrain.py): one job per `pretraining:` entry, the
# train split of its variants' caches in, a teacher backbone out. A `models:` entry with source pretrain:<name>
# loads that backbone, and every job that builds the model takes it as an input (common.smk, get_local_weights).


rule pretrain:
    input:
        unpack(get_pretrain_inputs),
    output:
        **pretrain_outputs(),
    log:
        "results/logs/pretrain/{name}.log",
    benchmark:
        "results/benchmarks/pretrain/{name}.tsv"
    wildcard_constraints:
        name=one_of(PRETRAINING) or "^$",
    # One cluster job per pretraining: a GPU job of its own, checkpointed (checkpoint_dir) and resumed by the
    # profile's retries after SIGTERM or preemption, as `train`.
    group:
        "pretrain"
    conda:
        "../../envs/torch.yaml"
    resources:
        # GPUs: N > 1 pretrains on N ranks under torchrun; the profiles map it.
        gpu=1,
    params:
        spec=get_pretrain_spec,
        init_model=get_pretrain_init,
        caches=get_pretrain_caches,
        resolution=get_pretrain_resolution,
        # Outside the declared outputs: Snakemake must not delete it when an attempt fails or is preempted.
        checkpoint_dir=PRETRAIN_CHECKPOINT_DIR,
        code=get_code("learn.pretrain"),
    script:
        "../../scripts/pretrain.py"
