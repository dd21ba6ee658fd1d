"""Checkpoints of a training run that resume it exactly, on every rank.

Layout under the output directory::

    snapshot_iter_000468/rank_0.npz   model (parameters and BN statistics), optimizer (momentum,
    snapshot_iter_000468/rank_1.npz   K-FAC factors, inverses, schedule, label sampler) and
                                      ``state``: loader position, RNG states, meters, options
    snapshot_iter_000468/meta.json    iteration, epoch, world size, arch, optimizer, options
    latest.json                       {"snapshot": "snapshot_iter_000468"}

Every rank writes its own file because ranks differ: each owns other K-FAC layers and keeps
its own BN running statistics.  Each file is written to a temporary name and renamed
(:func:`~kfac_mn.serializers.save_npz`); once every rank has written (a barrier), rank 0
writes ``meta.json``, then points ``latest.json`` at the new snapshot (also by rename) and
only then deletes the older snapshots.  A crash at any moment leaves ``latest.json`` naming a
complete snapshot.  The output directory is assumed to be shared by all ranks.
"""
import json
import os
import random
import shutil
import tempfile

import numpy

from kfac_mn.serializers import Deserializer, load_npz, save_npz

LATEST = "latest.json"
META = "meta.json"
SNAPSHOT_PREFIX = "snapshot_iter_"


def atomic_write_text(path, text):
    """Write ``text`` to ``path`` through a synced temporary file and a rename."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                                    dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise


def snapshot_name(iteration):
    return f"{SNAPSHOT_PREFIX}{iteration:06d}"


def rank_file(snapshot_dir, rank):
    return os.path.join(snapshot_dir, f"rank_{rank}.npz")


# -- RNG states -------------------------------------------------------------------------
def rng_states():
    """NumPy's global and Python's ``random`` states as JSON-friendly lists.

    (The loader's streams are pure functions of the position and K-FAC's label sampler is
    part of the optimizer's state, so these two are all the other randomness of a run.)
    """
    name, keys, position, has_gauss, cached = numpy.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached)],
            "python": [version, list(internal), gauss_next]}


def set_rng_states(states):
    name, keys, position, has_gauss, cached = states["numpy"]
    numpy.random.set_state((name, numpy.asarray(keys, dtype=numpy.uint32), position,
                            has_gauss, cached))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))


# -- one rank's file ----------------------------------------------------------------------
class RankSnapshot:
    """What one rank saves: ``model/...``, ``optimizer/...`` and the JSON ``state``.

    Saving serializes ``state`` (a dict); loading fills ``model`` and ``optimizer`` in place
    and sets ``state`` to the stored dict.
    """

    def __init__(self, model, optimizer, state=None):
        self.model = model
        self.optimizer = optimizer
        self.state = state

    def serialize(self, serializer):
        self.model.serialize(serializer["model"])
        self.optimizer.serialize(serializer["optimizer"])
        if isinstance(serializer, Deserializer):
            self.state = json.loads(bytes(serializer("state", None)).decode("utf-8"))
        else:
            text = json.dumps(self.state, sort_keys=True).encode("utf-8")
            serializer("state", numpy.frombuffer(text, dtype=numpy.uint8).copy())


def write_snapshot(out, comm, snapshot, meta):
    """Write this rank's file of the snapshot at ``meta['iteration']``; rank 0 then publishes
    it as the latest and removes the older ones.  Returns the snapshot directory."""
    directory = os.path.join(out, snapshot_name(meta["iteration"]))
    os.makedirs(directory, exist_ok=True)
    # uncompressed: K-FAC factors and inverses are large and compress poorly (zlib at a few
    # tens of MB/s would dominate the time of a checkpoint)
    save_npz(rank_file(directory, comm.rank), snapshot, compression=False)
    comm.barrier()
    if comm.rank == 0:
        atomic_write_text(os.path.join(directory, META), json.dumps(meta, indent=1,
                                                                    sort_keys=True))
        atomic_write_text(os.path.join(out, LATEST),
                          json.dumps({"snapshot": os.path.basename(directory)}))
        for name in sorted(os.listdir(out)):
            if name.startswith(SNAPSHOT_PREFIX) and name != os.path.basename(directory):
                shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    return directory


def latest_snapshot(out):
    """The directory ``out/latest.json`` names, or None when there is none."""
    pointer = os.path.join(out, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer, encoding="utf-8") as stream:
        return os.path.join(out, json.load(stream)["snapshot"])


# -- resuming -----------------------------------------------------------------------------
def find_snapshot(path):
    """The snapshot directory ``--resume path`` means: ``path`` itself (it has meta.json) or
    the latest snapshot of the output directory ``path``."""
    if os.path.isfile(os.path.join(path, META)):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--resume {path}: no such directory")
    latest = latest_snapshot(path)
    if latest is None:
        raise FileNotFoundError(f"--resume {path}: no checkpoint there (neither {META} of a "
                                f"snapshot nor {LATEST} of an output directory)")
    if not os.path.isfile(os.path.join(latest, META)):
        raise FileNotFoundError(f"--resume {path}: {LATEST} names {latest}, which has no "
                                f"{META}")
    return latest


def read_meta(snapshot_dir):
    with open(os.path.join(snapshot_dir, META), encoding="utf-8") as stream:
        return json.load(stream)


def check_resumable(snapshot_dir, meta, options, size, rank):
    """Raise ValueError/FileNotFoundError unless this run can continue ``snapshot_dir``."""
    saved = meta["options"]
    for key, flag in (("arch", "--arch"), ("optimizer", "--optimizer")):
        if saved[key] != getattr(options, key):
            raise ValueError(f"--resume {snapshot_dir}: the checkpoint was written with "
                             f"{flag} {saved[key]}, this run has {flag} "
                             f"{getattr(options, key)}")
    if meta["size"] != size:
        raise ValueError(f"--resume {snapshot_dir}: the checkpoint was written by "
                         f"{meta['size']} workers, this run has {size} (every worker keeps "
                         f"its own state; run with mpiexec -n {meta['size']})")
    if not os.path.isfile(rank_file(snapshot_dir, rank)):
        raise FileNotFoundError(f"--resume {snapshot_dir}: {rank_file(snapshot_dir, rank)} is "
                                "missing")


def load_snapshot(snapshot_dir, rank, snapshot):
    """Fill ``snapshot`` (a :class:`RankSnapshot`) from this rank's file; returns its state."""
    load_npz(rank_file(snapshot_dir, rank), snapshot)
    return snapshot.state
