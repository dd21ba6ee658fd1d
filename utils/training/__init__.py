"""The training harness of ``train_imagenet.py``, one job per module:

- ``options``: flags, ``--config`` files and their checks;
- ``datasets``: the datasets and loaders of a run;
- ``optimizer``: the optimizer (multi-node by itself), its hooks and schedules;
- ``step``: one update on a rank's batch, and one validation pass over all ranks;
- ``trainer``: the :class:`~utils.training.trainer.Trainer` (its explicit state, the loop,
  validation, checkpoints, the log and the closing report);
- ``checkpoint``: atomic per-rank snapshots and exact resume;
- ``log`` and ``plots``: ``log.jsonl`` and its PNG curves; ``progress``: the progress bar;
- ``stop_signals``: SIGTERM/SIGINT as a request agreed over the ranks;
- ``blas_threads``: one BLAS thread per core share, before NumPy starts;
- ``comparison``: the one-process K-FAC vs SGD protocol on MNIST of the comparison scripts.
"""
