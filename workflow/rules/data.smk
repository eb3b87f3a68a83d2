# The data half of the DAG: raw ISIC files -> manifest -> task -> grouped split -> resize (the clean variant's
# cache) -> degrade (each other variant's cache).


rule synth:
    output:
        **get_synth_outputs(),
    log:
        "results/logs/synth.log",
    benchmark:
        "results/benchmarks/synth.tsv"
    conda:
        "../../envs/data.yaml"
    params:
        root=get_synth_root,
        source=SOURCE,
        n=config["data"]["synthetic"]["n"],
        seed=config["data"]["synthetic"]["seed"],
        planted=config["data"]["synthetic"]["planted"],
        code=get_code("data.synth"),
    script:
        "../../scripts/synth.py"


# A cluster may scatter ingest and resize over N jobs each (`set-scatter: [ingest=N, resize=N]` in a profile):
# each part checks, or resizes, a fixed share of the images (a hash of the id; every n-th cache shard), and a
# gather job writes the very files one job writes. With N = 1 (the default) one job does it all.
if INGEST_PARTS == 1:

    rule ingest:
        input:
            **get_raw_inputs(),
        output:
            manifest="results/data/manifest.parquet",
            quarantine="results/data/quarantine.csv",
        log:
            "results/logs/ingest.log",
        benchmark:
            "results/benchmarks/ingest.tsv"
        conda:
            "../../envs/data.yaml"
        # Where the data are and what is there: a change of data.source, data.isic_root, data.extra_metadata or
        # of their files reruns ingest, whatever the files' times (get_data_source).
        params:
            source=SOURCE,
            data_source=get_data_source,
            max_pixels=config["data"]["max_pixels"],
            max_file_bytes=config["data"]["max_file_bytes"],
            image_types=config["data"]["image_types"],
            synthetic=SYNTHETIC_DATA,
            code=get_code("data.ingest"),
        script:
            "../../scripts/ingest.py"

else:

    rule ingest_part:
        input:
            **get_raw_inputs(),
        output:
            manifest=temp("results/data/ingest/{scatteritem}.parquet"),
        log:
            "results/logs/ingest/{scatteritem}.log",
        benchmark:
            "results/benchmarks/ingest/{scatteritem}.tsv"
        conda:
            "../../envs/data.yaml"
        # Where the data are and what is there: a change of data.source, data.isic_root, data.extra_metadata or
        # of their files reruns ingest, whatever the files' times (get_data_source).
        params:
            source=SOURCE,
            data_source=get_data_source,
            max_pixels=config["data"]["max_pixels"],
            max_file_bytes=config["data"]["max_file_bytes"],
            image_types=config["data"]["image_types"],
            synthetic=SYNTHETIC_DATA,
            part=get_part,
            parts=INGEST_PARTS,
            code=get_code("data.ingest"),
        script:
            "../../scripts/ingest.py"

    rule ingest:
        input:
            # The raw files too, so that the manifest's lineage names them.
            **get_raw_inputs(),
            parts=gather.ingest("results/data/ingest/{scatteritem}.parquet"),
        output:
            manifest="results/data/manifest.parquet",
            quarantine="results/data/quarantine.csv",
        log:
            "results/logs/ingest.log",
        conda:
            "../../envs/data.yaml"
        params:
            # Not read by the gather: recorded in the manifest's lineage, as one job's params are.
            synthetic=SYNTHETIC_DATA,
            code=get_code("data.ingest"),
        script:
            "../../scripts/ingest_gather.py"


rule task:
    input:
        manifest="results/data/manifest.parquet",
    output:
        task="results/data/task.parquet",
    log:
        "results/logs/task.log",
    benchmark:
        "results/benchmarks/task.tsv"
    conda:
        "../../envs/data.yaml"
    params:
        classes=config["data"]["classes"],
        balance=config["data"]["balance"],
        seed=config["data"]["seed"],
        code=get_code("data.task"),
    script:
        "../../scripts/task.py"


rule split:
    input:
        task="results/data/task.parquet",
    output:
        splits="results/data/splits.parquet",
        report="results/data/split_report.json",
    log:
        "results/logs/split.log",
    benchmark:
        "results/benchmarks/split.tsv"
    conda:
        "../../envs/data.yaml"
    params:
        group_columns=config["split"]["group_columns"],
        test_fraction=config["split"]["test_fraction"],
        val_fraction=config["split"]["val_fraction"],
        seed=config["split"]["seed"],
        code=get_code("data.split"),
    script:
        "../../scripts/split.py"


if RESIZE_PARTS == 1:

    rule resize:
        input:
            splits="results/data/splits.parquet",
            manifest="results/data/manifest.parquet",
            images=get_raw_inputs()["images"],
        output:
            # The clean variant is the resized pixels, cached as they are made: one stored copy.
            cache=directory("results/cache/{res}px/clean"),
        log:
            "results/logs/resize/{res}px.log",
        benchmark:
            "results/benchmarks/resize/{res}px.tsv"
        conda:
            "../../envs/data.yaml"
        # A thread pool decodes and resizes (Pillow releases the GIL): one thread per 1000 images, so that small
        # jobs run side by side; profiles may set it.
        threads: get_data_threads
        params:
            policy=config["resize"]["policy"],
            reduced_decode=config["resize"]["reduced_decode"],
            max_pixels=config["data"]["max_pixels"],
            max_file_bytes=config["data"]["max_file_bytes"],
            classes=config["data"]["classes"],
            rows_per_shard=config["cache"]["rows_per_shard"],
            row_group_size=config["cache"]["row_group_size"],
            code=get_code("data.resize"),
        script:
            "../../scripts/resize.py"

else:

    rule resize_part:
        input:
            splits="results/data/splits.parquet",
            manifest="results/data/manifest.parquet",
            images=get_raw_inputs()["images"],
        output:
            # The clean variant is the resized pixels, cached as they are made: one stored copy.
            cache=temp(directory("results/cache/{res}px/clean.parts/{scatteritem}")),
        log:
            "results/logs/resize/{res}px/{scatteritem}.log",
        benchmark:
            "results/benchmarks/resize/{res}px/{scatteritem}.tsv"
        conda:
            "../../envs/data.yaml"
        # A thread pool decodes and resizes (Pillow releases the GIL): one thread per 1000 images, so that small
        # jobs run side by side; profiles may set it.
        threads: get_data_threads
        params:
            policy=config["resize"]["policy"],
            reduced_decode=config["resize"]["reduced_decode"],
            max_pixels=config["data"]["max_pixels"],
            max_file_bytes=config["data"]["max_file_bytes"],
            classes=config["data"]["classes"],
            rows_per_shard=config["cache"]["rows_per_shard"],
            row_group_size=config["cache"]["row_group_size"],
            part=get_part,
            parts=RESIZE_PARTS,
            code=get_code("data.resize"),
        script:
            "../../scripts/resize.py"

    rule resize:
        input:
            splits="results/data/splits.parquet",
            manifest="results/data/manifest.parquet",
            images=get_raw_inputs()["images"],
            parts=get_resize_parts,
        output:
            cache=directory("results/cache/{res}px/clean"),
        log:
            "results/logs/resize/{res}px.log",
        conda:
            "../../envs/data.yaml"
        params:
            code=get_code("data.resize"),
        script:
            "../../scripts/resize_gather.py"


rule degrade:
    input:
        unpack(get_degrade_input),
    output:
        cache=directory("results/cache/{res}px/{variant}"),
    log:
        "results/logs/degrade/{res}px/{variant}.log",
    benchmark:
        "results/benchmarks/degrade/{res}px/{variant}.tsv"
    # Every variant but clean, which the resize rule writes.
    wildcard_constraints:
        variant=DEGRADED_VARIANTS,
    conda:
        "../../envs/data.yaml"
    # A thread pool degrades (Pillow and OpenCV release the GIL): one thread per 1000 images; profiles may set it.
    threads: get_data_threads
    params:
        variant=get_variant,
        order=config["degrade"]["order"],
        max_pixels=config["data"]["max_pixels"],
        max_file_bytes=config["data"]["max_file_bytes"],
        code=get_code("data.degrade"),
    script:
        "../../scripts/degrade.py"
