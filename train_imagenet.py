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

Nothing good is lost: every option, file and label is checked on every rank before any work;
snapshots are verified on resume (the newest intact one is used); a run that diverges stops
without writing; a rank that hangs is named by the watchdog (``--timeout``), which ends the
job.  A run written by P workers resumes on Q when the global batch can be kept.

Exit status: 0 done, 1 diverged (loss, weights or validation not finite, a factor K-FAC
cannot invert, a loss that stays too high), 2 bad options or data, 3 a snapshot could not be
written (the previous one is kept), 4 a collective timed out (the watchdog aborted the job),
128 + signal number after a checkpoint on SIGTERM/SIGINT.
"""
import os
import sys

from utils.training.blas_threads import share_cores_between_ranks

share_cores_between_ranks()  # before NumPy starts its BLAS threads

import numpy  # noqa: E402

from kfac_mn import backend  # noqa: E402
from kfac_mn.communicators import (  # noqa: E402
    LaunchMismatch,
    NcclUnavailable,
    create_communicator,
    init_mpi,
)
from kfac_mn.communicators.watchdog import Watchdog, WatchedCommunicator  # noqa: E402
from models import archs  # noqa: E402
from utils.training import snapshot_reader  # noqa: E402
from utils.training.data_checks import DecodeProgress, check_files  # noqa: E402
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
from utils.training.resume_checks import check_resumable, keep_global_batch  # noqa: E402
from utils.training.step import MeteredClassifier  # noqa: E402
from utils.training.trainer import PROG, Trainer  # noqa: E402

EXIT_USAGE = 2
EXIT_HUNG = 4


def fail_usage(message, rank):
    """Report a usage error once (rank 0) and leave with status 2 on every rank."""
    if rank == 0:
        sys.stderr.write(f"{PROG}: error: {message}\n")
        sys.stderr.flush()
    sys.exit(EXIT_USAGE)


def _message(error):
    return error.args[0] if isinstance(error, KeyError) and error.args else str(error)


def choose_resume(options, comm):
    """The snapshot ``--resume`` means, verified (collective): ``(directory, meta)`` or
    ``(None, None)``; says which damaged snapshots were passed over."""
    if options.resume is None:
        return None, None
    directory, meta, skipped = snapshot_reader.choose_snapshot(options.resume, comm)
    if skipped and comm.rank == 0:
        sys.stderr.write(f"{PROG}: --resume {options.resume}: passed over damaged snapshots "
                         f"({'; '.join(skipped)}); resuming from {directory}, the newest "
                         "intact one\n")
    keep_global_batch(options, meta, comm.size)
    return directory, meta


def prepare(options, comm, resume_dir, resume_meta):
    """Everything that can fail on bad input and needs no other rank, before any training:
    the batch arithmetic, the datasets, the model, the resume checkpoint's compatibility.
    Returns (train set, val set, model); raises OptionError/ValueError/OSError/KeyError."""
    check_world(options, comm.size)
    options.global_batch = global_batch(options, comm.size)  # resolved, as options.json says
    kind = dataset_kind(options)
    resolve_arch(options, kind)
    if options.gpu and not backend.gpu_available():
        raise OptionError("--gpu needs CuPy and a visible CUDA device")
    try:
        backend.set_conv_backend(options.conv_backend)
    except backend.CudnnUnavailable as error:
        raise OptionError(f"--conv-backend cudnn needs {error}; leave it out for the im2col "
                          "path") from None
    train_set, val_set = build_datasets(options)
    numpy.random.seed(options.seed)  # the initializers draw from NumPy's global RNG
    model = archs[options.arch](n_class=train_set.n_class, in_channels=train_set.channels)
    if kind == "images":
        resolve_image_sizes(options, model.insize)
    if resume_meta is not None:
        check_resumable(resume_dir, resume_meta, options, comm.size, len(train_set))
    return train_set, val_set, model


def agree_on_errors(comm, error):
    """Every rank learns whether any rank failed; returns the message to report (or None)."""
    errors = comm.gather_obj(None if error is None else _message(error))
    combined = None
    if comm.rank == 0 and any(e is not None for e in errors):
        distinct = sorted({e for e in errors if e is not None})
        combined = distinct[0] if len(distinct) == 1 else "; ".join(
            f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None)
    return comm.bcast_obj(combined)


def checked(comm, phase, *args):
    """``phase(*args)`` on every rank; any rank's bad input ends every rank (status 2)."""
    error = result = None
    try:
        result = phase(*args)
    except (OptionError, ValueError, OSError, KeyError) as caught:
        error = caught
    message = agree_on_errors(comm, error)
    if message is not None:
        fail_usage(message, comm.rank)
    return result


def check_data(options, train_set, val_set, comm):
    """The files of both sets, shared out among the ranks (:mod:`data_checks`)."""
    progress = None
    if options.verify_images and comm.rank == 0 and options.progress:
        progress = DecodeProgress((len(train_set) + len(val_set)) // comm.size)
    threads = max(1, (os.cpu_count() or 1) // max(1, comm.intra_size))
    problems = check_files(options, train_set, val_set, comm, threads, progress)
    if problems and comm.rank == 0:
        sys.stderr.write(f"{PROG}: --skip-corrupt: {len(problems)} unreadable image "
                         f"file(s) will be gone past: {'; '.join(problems[:20])}"
                         f"{' ...' if len(problems) > 20 else ''}\n")


def watched(options, comm):
    """``comm`` under the watchdog of ``--timeout`` (collective), or as it is."""
    if comm.size == 1 or not options.timeout:
        return comm, None
    watchdog = Watchdog(comm.mpi_comm, options.timeout, exit_code=EXIT_HUNG,
                        hint=f"restart the job with --resume {options.out} (its last good "
                             "snapshot)")
    return WatchedCommunicator(comm, watchdog), watchdog.start()


def main(argv=None):
    # MPI starts here, not at import: loader workers started by forkserver import this
    # module and must not initialise MPI; init_mpi first checks that the launcher belongs to
    # mpi4py's MPI library
    try:
        MPI = init_mpi()
    except LaunchMismatch as error:  # before MPI_Init: no rank knows its number
        fail_usage(str(error), 0)
    world_rank = MPI.COMM_WORLD.Get_rank()
    try:
        options = parse_options(argv)
        comm = create_communicator(options.communicator, collectives=options.collectives,
                                   alpha=options.comm_alpha, bandwidth=options.comm_bandwidth)
    except OptionError as error:
        fail_usage(str(error), world_rank)
    except LaunchMismatch as error:  # every rank alone: nobody to agree with
        fail_usage(str(error), 0)
    except NcclUnavailable as error:  # CuPy, NCCL or a GPU is missing
        fail_usage(f"--communicator nccl needs {error.reason}; leave out --communicator "
                   "nccl (and --gpu) to run on the CPU over MPI", world_rank)
    resume_dir, resume_meta = checked(comm, choose_resume, options, comm)
    train_set, val_set, model = checked(comm, prepare, options, comm, resume_dir,
                                        resume_meta)
    checked(comm, check_data, options, train_set, val_set, comm)

    classifier = MeteredClassifier(model)
    if options.gpu:
        backend.cupy.cuda.Device(comm.intra_rank).use()
        classifier.to_gpu()
    comm, watchdog = watched(options, comm)
    optimizer = build_optimizer(options, comm, classifier)  # rank 0's weights on every rank
    schedules = build_schedules(options, comm.size)
    train_loader, val_loader = build_loaders(options, train_set, val_set, comm.rank,
                                             comm.size)
    trainer = Trainer(options, comm, classifier, optimizer, schedules, train_loader,
                      val_loader, len(train_set))
    kept_records = trainer.resume(resume_dir, resume_meta) if resume_dir is not None else []
    trainer.start_log(kept_records)
    try:
        status = trainer.run()
        if status == 0:
            trainer.finish()
    finally:
        train_loader.close()
        val_loader.close()
        if watchdog is not None:
            watchdog.stop()
    return status


if __name__ == "__main__":
    sys.exit(main())
