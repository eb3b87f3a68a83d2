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


rule figure_curves:
    input:
        metrics=get_experiment_metrics,
        histories=get_experiment_histories,
    output:
        png=report(
            "results/figures/{experiment}_curves.png",
            caption="../report/figure_curves.rst",
            category="figures",
            subcategory="{experiment}",
            labels={"experiment": "{experiment}", "figure": "training curves"},
        ),
    log:
        "results/logs/aggregate/figure_{experiment}_curves.log",
    conda:
        "../../envs/report.yaml"
    params:
        kind="curves",
        title=get_title,
        runs=get_experiment_runs,
        code=get_code("study.figures"),
    script:
        "../../scripts/figure.py"


use rule figure_curves as figure_cost with:
    input:
        metrics=get_experiment_metrics,
    output:
        png=report(
            "results/figures/{experiment}_cost.png",
            caption="../report/figure_cost.rst",
            category="figures",
            subcategory="{experiment}",
            labels={"experiment": "{experiment}", "figure": "accuracy vs cost"},
        ),
    log:
        "results/logs/aggregate/figure_{experiment}_cost.log",
    params:
        kind="cost",
        title=get_title,
        runs=get_experiment_runs,
        code=get_code("study.figures"),


use rule figure_curves as figure_robustness with:
    input:
        metrics=get_experiment_metrics,
    output:
        png=report(
            "results/figures/{experiment}_robustness.png",
            caption="../report/figure_robustness.rst",
            category="figures",
            subcategory="{experiment}",
            labels={"experiment": "{experiment}", "figure": "robustness heat map"},
        ),
    log:
        "results/logs/aggregate/figure_{experiment}_robustness.log",
    params:
        kind="robustness",
        title=get_title,
        runs=get_experiment_runs,
        code=get_code("study.figures"),


use rule figure_curves as figure_label_efficiency with:
    input:
        metrics=get_experiment_metrics,
    output:
        png=report(
            "results/figures/{experiment}_label_efficiency.png",
            caption="../report/figure_label_efficiency.rst",
            category="figures",
            subcategory="{experiment}",
            labels={"experiment": "{experiment}", "figure": "label efficiency"},
        ),
    log:
        "results/logs/aggregate/figure_{experiment}_label_efficiency.log",
    params:
        kind="label_efficiency",
        title=get_title,
        runs=get_experiment_runs,
        code=get_code("study.figures"),


# Drawn from the experiment's table (bytes and paired differences beside the metrics), not from the runs.
rule figure_rate_accuracy:
    input:
        table="results/tables/{experiment}.csv",
    output:
        png=report(
            "results/figures/{experiment}_rate_accuracy.png",
            caption="../report/figure_rate_accuracy.rst",
            category="figures",
            subcategory="{experiment}",
            labels={"experiment": "{experiment}", "figure": "rate-accuracy"},
        ),
    log:
        "results/logs/aggregate/figure_{experiment}_rate_accuracy.log",
    conda:
        "../../envs/report.yaml"
    params:
        kind="rate_accuracy",
        title=get_title,
        runs=get_experiment_runs,
        code=get_code("study.rate_figures"),
    script:
        "../../scripts/table_figure.py"


use rule figure_rate_accuracy as figure_forest with:
    output:
        png=report(
            "results/figures/{experiment}_forest.png",
            caption="../report/figure_forest.rst",
            category="figures",
            subcategory="{experiment}",
            labels={"experiment": "{experiment}", "figure": "paired differences"},
        ),
    log:
        "results/logs/aggregate/figure_{experiment}_forest.log",
    params:
        kind="forest",
        title=get_title,
        runs=get_experiment_runs,
        code=get_code("study.rate_figures"),


# Drawn from the experiment's table (its rows, runs and test ECE) and the runs' test predictions.
rule figure_reliability:
    input:
        table="results/tables/{experiment}.csv",
        predictions=get_experiment_predictions,
    output:
        png=report(
            "results/figures/{experiment}_reliability.png",
            caption="../report/figure_reliability.rst",
            category="figures",
            subcategory="{experiment}",
            labels={"experiment": "{experiment}", "figure": "reliability"},
        ),
    log:
        "results/logs/aggregate/figure_{experiment}_reliability.log",
    conda:
        "../../envs/report.yaml"
    params:
        title=get_title,
        classes=config["data"]["classes"],
        runs=get_experiment_runs,
        code=get_code("study.calibration_figure"),
    script:
        "../../scripts/reliability_figure.py"


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


rule figure_subgroups:
    input:
        subgroups="results/tables/{experiment}_subgroups.csv",
    output:
        png=report(
            "results/figures/{experiment}_subgroups.png",
            caption="../report/figure_subgroups.rst",
            category="figures",
            subcategory="{experiment}",
            labels={"experiment": "{experiment}", "figure": "Δ AUC by subgroup"},
        ),
    log:
        "results/logs/aggregate/figure_{experiment}_subgroups.log",
    conda:
        "../../envs/report.yaml"
    params:
        title=get_title,
        runs=get_experiment_runs,
        code=get_code("study.subgroup_figure"),
    script:
        "../../scripts/subgroup_figure.py"
