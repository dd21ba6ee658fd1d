"""The input pipeline: datasets, decoding, augmentation and loading.

Modules, one job each:

- ``image_decoding``: file -> lazily opened / decoded ``PIL.Image`` (RGB or L, optionally
  at reduced JPEG scale) with errors that name the path.
- ``pillow_pixels``: zero-copy NumPy views of decoded Pillow pixels.
- ``image_file_dataset``, ``image_list``, ``image_folder``, ``mnist``: datasets in Chainer
  style (``len(ds)``, ``ds[i] -> (float32 CHW image in [0, 1], int32 label)``), plus the
  ``get_image(i)`` / ``get_label(i)`` pair the loader uses; ``dataset_index``: their one
  index check.
- ``normalization``: per-channel mean/std (ImageNet, MNIST) or a Chainer mean image.
- ``transforms``: per-example train / eval transforms (random-resized crop, flip,
  random erasing; resize + centre crop), with OpenCV; ``scratch``: their per-thread work
  arrays.
- ``batch_augmentation``: mixup and label smoothing on whole batches.
- ``seeding``: every random stream as a pure function of (seed, epoch, ...).
- ``sharding``: which examples each MPI rank reads at each iteration.
- ``batch_builder``, ``loader_workers``, ``loader``: the per-rank parallel loader
  (``loader.ShardedLoader`` is the entry point).
- ``error_notes``: context notes on exceptions (path of the example, worker traceback).
- ``sample_photos``: small ImageNet-layout trees of real photos for tests and benchmarks.
"""
