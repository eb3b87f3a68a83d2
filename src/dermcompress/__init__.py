"""dermcompress: what pretrained models lose, and what we save, when dermoscopy images are shrunk and compressed.

One module per stage of the workflow (synth, ingest, task, split, resize, degrade, cache); the Snakemake rules
call them through thin scripts in scripts/.
"""

__version__ = "0.1.0"

# The ISIC 2019 diagnostic classes, in the ground-truth CSV's column order (UNK is never set in 2019).
ISIC_CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")
