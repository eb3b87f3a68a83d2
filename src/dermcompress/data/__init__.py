"""The data half of the DAG: raw sources to cached pixels.

sources, datasets, fetch    where the images and labels are (ISIC 2019/2020, HAM10000, the ISIC Archive), and
                            getting them
synth, synth_plan,          a synthetic stand-in for each source: its plan; drawing, encoding and writing its
  synth_draw, synth_layouts   images; the ISIC 2019 layout and the other sources' layouts
ingest, manifest, groups    checked images and labels -> manifest (+ quarantine), lesion/patient groups
task, split, subsample      the label task, the grouped train/val/test split, grouped label fractions
resize, degrade, codec      resized clean pixels; JPEG / blur / quantization degradations; codec round trips
imagepool                   the stages' thread pool over images; rereading the raw files ingest checked
images, pixeltable          decoding, pixel tables
cache, cache_write          the sharded parquet caches: their format and reading them; writing them
loader                      the PyTorch loader over a cache
integrity                   every file a stage hands on: written atomically with its checksum, verified when read

May import: the standard library, third-party packages, `dermcompress` (ISIC_CLASSES) and `dermcompress.errors`;
never `learn`, `study`, `provenance` or `config`, so that editing a model, an experiment grid or the lineage
code reruns no data stage (tests/test_layering.py checks it on the code fingerprints' import closures).
"""
