"""The study: experiment grids over runs, and what they become: tables, figures, comparisons, plans.

experiments         the grids of config.yaml's `experiments:`, expanded to runs and evaluations
aggregate, tables   per-experiment tables (val-selected settings, costs, bytes), the runs index, data summary
compare, contrasts  paired differences, each row against its own reference row, by tests valid for the contrast
clustered_roc       Obuchowski's clustered ROC test (DeLong's with one image per lesion)
calibration         ECE and Brier score of a run's probabilities; calibration_figure, the reliability diagram
figures, rate_figures  training curves, cost, robustness, label efficiency; rate-accuracy and forest plots
bytes_summary       kB per image and bits per pixel of every cache
plan                jobs, GPU hours and cluster submissions before anything runs
export              predictions in the ISIC challenge's submission format

May import: `data`, `learn`, `dermcompress.errors`; never `provenance` beyond `provenance.fingerprint`, or `config`.
"""
