"""Train a ResNet with distributed K-FAC (or momentum SGD) under mpiexec: the reproduction harness.

    mpiexec -n 2 python train_imagenet.py        # embedded MNIST, resnet_mnist, K-FAC
    mpiexec -n 128 python train_imagenet.py --config configs/kfac_4k.json \\
        --train /data/imagenet/train --val /data/imagenet/val
    python train_imagenet.py --help               # every option

Every rank holds the whole model and trains on its shard of each global batch
(``workers x batchsize x acc-iters`` examples per update).  The recipe, as in Chainer's
ImageNet example: options, communicator, datasets and model (everything that can fail on bad
input, checked on every rank before any work), then the model on its device, the multi-node
optimizer, the lr schedules and the loaders, handed to a
:class:`~utils.training.trainer.Trainer` that runs the loop (validation and checkpoint at each
epoch end, ``log.jsonl``, a stop on SIGTERM/SIGINT or on a NaN loss).  Rank 0 shows a
progress bar and, at the end, writes ``loss.png`` and ``accuracy.png``.

Exit status: 0 done, 1 diverged (NaN/inf loss), 2 bad options or data (before any work),
128 + signal number after a checkpoint on SIGTERM/SIGINT.
"""
import sys

from utils.training.blas_threads import share_cores_between_ranks

share_cores_between_ranks()  # before NumPy starts its BLAS threads

import numpy  # noqa: E402

from kfac_mn import backend  # noqa: E402
from kfac_mn.communicators import create_communicator  # noqa: E402
from models import archs  # noqa: E402
from utils.training import checkpoint  # noqa: E402
from utils.training.datasets import build_datasets, build_loaders, dataset_kind  # noqa: E402
from utils.training.optimizer import build_optimizer, build_schedules  # noqa: E402
from utils.training.options import (  # noqa: E402
    OptionError,
    check_world,
    global_batch,
    parse_options,
    resolve_arch,
    resolve_image_sizes,
)
from utils.training.step import MeteredClassifier  # noqa: E402
from utils.training.trainer import PROG, Trainer  # noqa: E402

EXIT_USAGE = 2


def fail_usage(message, rank):
    """Report a usage error once (rank 0) and leave with status 2 on every rank."""
    if rank == 0:
        sys.stderr.write(f"{PROG}: error: {message}\n")
        sys.stderr.flush()
    sys.exit(EXIT_USAGE)


def _message(error):
    return error.args[0] if isinstance(error, KeyError) and error.args else str(error)


def prepare(options, comm):
    """Everything that can fail on bad input, before any training: the datasets, the resume
    checkpoint's compatibility, the model.  Returns (train set, val set, model, snapshot folder
    to resume or None); raises OptionError/ValueError/OSError/KeyError."""
    check_world(options, comm.size)
    kind = dataset_kind(options)
    resolve_arch(options, kind)
    if options.gpu and not backend.gpu_available():
        raise OptionError("--gpu needs CuPy and a visible CUDA device")
    train_set, val_set = build_datasets(options)
    resume_dir = None
    if options.resume is not None:
        resume_dir = checkpoint.find_snapshot(options.resume)
        meta = checkpoint.read_meta(resume_dir)
        checkpoint.check_resumable(resume_dir, meta, options, comm.size, comm.rank)
        for key, flag, mine in (("seed", "--seed", options.seed),
                                ("global_batch", "--global-batch",
                                 global_batch(options, comm.size)),
                                ("train_examples", "--train/--train-size", len(train_set))):
            if meta[key] != mine:
                raise ValueError(f"--resume {resume_dir}: the checkpoint has {key} "
                                 f"{meta[key]}, this run {mine} ({flag}); the data order "
                                 "could not continue")
    numpy.random.seed(options.seed)  # the initializers draw from NumPy's global RNG
    model = archs[options.arch](n_class=train_set.n_class, in_channels=train_set.channels)
    if kind == "images":
        resolve_image_sizes(options, model.insize)
    return train_set, val_set, model, resume_dir


def agree_on_errors(comm, error):
    """Every rank learns whether any rank failed; returns the message to report (or None)."""
    errors = comm.gather_obj(None if error is None else _message(error))
    combined = None
    if comm.rank == 0 and any(e is not None for e in errors):
        distinct = sorted({e for e in errors if e is not None})
        combined = distinct[0] if len(distinct) == 1 else "; ".join(
            f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None)
    return comm.bcast_obj(combined)


def main(argv=None):
    # imported here, not at the top: loader workers started by forkserver import this module
    # and must not initialise MPI
    from mpi4py import MPI

    world_rank = MPI.COMM_WORLD.Get_rank()
    try:
        options = parse_options(argv)
        comm = create_communicator(options.communicator, collectives=options.collectives,
                                   alpha=options.comm_alpha, bandwidth=options.comm_bandwidth)
    except OptionError as error:
        fail_usage(str(error), world_rank)
    except RuntimeError as error:  # what the communicator needs is missing (CuPy, NCCL, GPU)
        fail_usage(f"--communicator {options.communicator}: {error}", world_rank)
    error = prepared = None
    try:
        prepared = prepare(options, comm)
    except (OptionError, ValueError, OSError, KeyError) as caught:
        error = caught
    message = agree_on_errors(comm, error)
    if message is not None:
        fail_usage(message, comm.rank)
    train_set, val_set, model, resume_dir = prepared

    classifier = MeteredClassifier(model)
    if options.gpu:
        backend.cupy.cuda.Device(comm.intra_rank).use()
        classifier.to_gpu()
    optimizer = build_optimizer(options, comm, classifier)  # rank 0's weights on every rank
    schedules = build_schedules(options, comm.size)
    train_loader, val_loader = build_loaders(options, train_set, val_set, comm.rank,
                                             comm.size)
    trainer = Trainer(options, comm, classifier, optimizer, schedules, train_loader,
                      val_loader, len(train_set))
    kept_records = trainer.resume(resume_dir) if resume_dir is not None else []
    trainer.start_log(kept_records)
    try:
        status = trainer.run()
        if status == 0:
            trainer.finish()
    finally:
        train_loader.close()
        val_loader.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
