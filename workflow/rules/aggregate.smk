# Aggregation: rules that only read run outputs -> the data summary, the runs index, one table per experiment and
# the figures its grid calls for (experiments.figure_kinds). `snakemake --report` gathers them into report.html.


rule data_summary:
    input:
        manifest="results/data/manifest.parquet",
        split_report="results/data/split_report.json",
    output:
        md="results/data/summary.md",
        html=report(
            "results/data/summary.html",
            caption="../report/data_summary.rst",
            category="data",
        ),
    log:
        "results/logs/aggregate/data_summary.log",
    conda:
        "../../envs/report.yaml"
    params:
        code=get_code("study.tables"),
    script:
        "../../scripts/data_summary.py"


rule bytes_summary:
    input:
        caches=get_all_caches(),
    output:
        csv="results/data/bytes.csv",
        md="results/data/bytes.md",
        html=report(
            "results/data/bytes.html",
            caption="../report/bytes_summary.rst",
            category="data",
        ),
    log:
        "results/logs/aggregate/bytes_summary.log",
    conda:
        "../../envs/report.yaml"
    params:
        code=get_code("study.bytes_summary"),
    script:
        "../../scripts/bytes_summary.py"


rule runs_index:
    input:
        metrics=get_all_metrics(),
    output:
        csv="results/runs/index.csv",
        html=report(
            "results/runs/index.html",
            caption="../report/runs_index.rst",
            category="runs",
        ),
    log:
        "results/logs/aggregate/runs_index.log",
    conda:
        "../../envs/report.yaml"
    params:
        code=get_code("study.tables"),
    script:
        "../../scripts/runs_index.py"


rule table:
    input:
        metrics=get_experiment_metrics,
        predictions=get_experiment_predictions,
        caches=get_experiment_caches,
    output:
        csv="results/tables/{experiment}.csv",
        md="results/tables/{experiment}.md",
        tex="results/tables/{experiment}.tex",
        html=report(
            "results/tables/{experiment}.html",
            caption="../report/table.rst",
            category="tables",
            labels={"experiment": "{experiment}"},
        ),
    log:
        "results/logs/aggregate/table_{experiment}.log",
    conda:
        "../../envs/report.yaml"
    params:
        title=get_title,
        classes=config["data"]["classes"],
        reference=get_reference,
        family=get_family,
        interaction=get_interaction,
        n_bootstrap=config["training"]["n_bootstrap"],
        runs=get_experiment_runs,
        code=get_code("study.tables"),
    script:
        "../../scripts/table.py"


# Each experiment's table by subgroup (sex, age band, site): its runs' test predictions joined to the manifest.
rule subgroups:
    input:
        table="results/tables/{experiment}.csv",
        manifest="results/data/manifest.parquet",
        predictions=get_experiment_predictions,
    output:
        csv="results/tables/{experiment}_subgroups.csv",
        md="results/tables/{experiment}_subgroups.md",
        html=report(
            "results/tables/{experiment}_subgroups.html",
            caption="../report/subgroups.rst",
            category="tables",
            labels={"experiment": "{experiment}", "table": "by subgroup"},
        ),
    log:
        "results/logs/aggregate/subgroups_{experiment}.log",
    conda:
        "../../envs/report.yaml"
    params:
        title=get_title,
        classes=config["data"]["classes"],
        min_images=config["subgroups"]["min_images"],
        age_bands=config["subgroups"]["age_bands"],
        n_bootstrap=config["training"]["n_bootstrap"],
        runs=get_experiment_runs,
        code=get_code("study.subgroups"),
    script:
        "../../scripts/subgroups.py"


# An experiment's figures (experiments.figure_kinds), all drawn by one job: a figure takes tenths of a second to
# draw, a process most of a second to start. One rule per set of kinds, as the evaluations' per set of variants.
for kinds, names in FIGURE_JOBS.items():

    rule:
        name:
            rule_name("figures", kinds, "kinds")
        input:
            unpack(get_figure_inputs(kinds)),
        output:
            **figure_outputs(kinds),
        log:
            "results/logs/aggregate/figures_{experiment}.log",
        wildcard_constraints:
            experiment=one_of(names),
        localrule: True
        conda:
            "../../envs/report.yaml"
        params:
            kinds=list(kinds),
            title=get_title,
            classes=config["data"]["classes"],
            runs=get_experiment_runs,
            code=get_code("study.figure_jobs"),
        script:
            "../../scripts/figures.py"
