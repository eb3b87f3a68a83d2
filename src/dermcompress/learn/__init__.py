"""Learning: models, training, frozen features and their evaluation, on the data half's caches.

runs, settings              what a run is (its identity, folder, files) and its checked training settings
registry, backbones,        the model registry, backbone builders, weights (hub, files, converted checkpoints)
  weights, models             and the classifier around a backbone (heads, LoRA, frozen blocks)
train, loop, checkpoints,   finetuning: the loop, resumable checkpoints, DDP under torchrun, optimizer,
  distributed, optim,         augmentation, training phases and modes, devices and precision
  augment, phases, modes,
  devices
evaluate, inference,        evaluating a run; frozen features, linear probes and kNN on them
  features, probes, knn
metrics, bootstrap, flops   scores with bootstrap intervals; model cost (GMACs, parameters)
pretrain, pretrain_loop,    domain self-supervised pretraining (DINO, with lightly): the spec, its images
  pretrain_data, dino,        (train groups only), the loop, multi-crop views, collapse monitors, and the
  crops, collapse,            adaptation of the init backbone (full, frozen blocks, LoRA merged when saved)
  adaptation

May import: `data`, `dermcompress.errors`, and of `provenance` only `provenance.fingerprint` (a checkpoint is
keyed by its training code's fingerprint); never `study` or `config`.
"""
