"""What ``train_imagenet.py`` is built from, besides the library and the models.

- :mod:`utils.data`: the input pipeline (datasets, decoding, augmentation, sharded loading).
- :mod:`utils.training`: the training harness (options, the trainer and its update step,
  checkpoints, log, plots, stop signals).
"""
