"""Checkpoints of a training run: written so that nothing good is ever lost.

Layout under the output directory::

    snapshot_iter_000468/rank_0.npz       model (parameters and BN statistics), optimizer
    snapshot_iter_000468/rank_1.npz       (momentum, K-FAC factors, inverses, schedule, label
                                          sampler) and ``state``: loader position, RNG states,
                                          meters, options
    snapshot_iter_000468/meta.json        iteration, epoch, world size, options, and the size
                                          and SHA-256 of every rank's file
    snapshot_iter_000468/validation.json  the validation figures, once they were finite
    latest.json                           {"snapshot": "snapshot_iter_000468"}

Every rank writes its own file because ranks differ: each owns other K-FAC layers and keeps
its own BN running statistics.  Writing one snapshot (:func:`write_snapshot`):

1. every rank checks that each array it is about to save is finite; if any rank finds one
   that is not, nothing is written (:class:`NonFiniteState`: the run has diverged);
2. the files go into a hidden ``.snapshot_iter_N.partial`` folder, each through a temporary
   name and a rename;
3. rank 0 learns every rank's checksum or error; on any error (a full disk, say) the partial
   folder is removed and :class:`SnapshotWriteError` names the file and the reason on every
   rank; the previous snapshot stays the latest;
4. otherwise rank 0 writes ``meta.json`` (with the checksums), renames the folder into place,
   points ``latest.json`` at it (by rename) and only then removes old snapshots, keeping the
   newest ``keep`` and the newest one whose validation passed (:func:`prune`).

A crash at any moment leaves ``latest.json`` naming a complete snapshot.  The output
directory is assumed to be shared by all ranks.  Reading snapshots back, with their
checksums, is :mod:`utils.training.snapshot_reader`.
"""
import hashlib
import json
import math
import os
import random
import re
import shutil
import tempfile

import numpy

from kfac_mn.serializers import Deserializer, DictionarySerializer, save_npz
from utils.training.agreement import agreed_messages

LATEST = "latest.json"
META = "meta.json"
VALIDATION = "validation.json"
SNAPSHOT_PREFIX = "snapshot_iter_"
SNAPSHOT_PATTERN = re.compile(r"^snapshot_iter_(\d+)$")


class NonFiniteState(ArithmeticError):
    """A parameter or optimizer array is NaN or infinite: the snapshot would not be good."""


class SnapshotWriteError(OSError):
    """A rank could not write its part of a snapshot (the message names the file)."""


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
    return os.path.join(snapshot_dir, rank_file_name(rank))


def rank_file_name(rank):
    return f"rank_{rank}.npz"


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def sealed_meta(meta):
    """``meta`` with ``checksum``: the SHA-256 of its other keys as sorted JSON (what
    :func:`~utils.training.snapshot_reader.read_meta` verifies)."""
    body = {key: value for key, value in meta.items() if key != "checksum"}
    text = json.dumps(body, sort_keys=True)
    return {**body, "checksum": hashlib.sha256(text.encode("utf-8")).hexdigest()}


def snapshots_in(out):
    """``[(iteration, directory)]`` of the snapshot folders of ``out``, newest first."""
    found = []
    if os.path.isdir(out):
        for name in os.listdir(out):
            match = SNAPSHOT_PATTERN.match(name)
            if match and os.path.isdir(os.path.join(out, name)):
                found.append((int(match.group(1)), os.path.join(out, name)))
    return sorted(found, reverse=True)


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


class _Arrays:
    """Already serialized arrays, saved as they are."""

    def __init__(self, arrays):
        self.arrays = arrays

    def serialize(self, serializer):
        for key, value in self.arrays.items():
            serializer(key, value)


def non_finite_keys(arrays):
    """The keys of the floating-point arrays holding NaN or infinity, sorted."""
    return sorted(key for key, value in arrays.items()
                  if value.dtype.kind in "fc" and not numpy.isfinite(value).all())


# -- writing ------------------------------------------------------------------------------
def write_snapshot(out, comm, snapshot, meta, keep=2):
    """Write the snapshot at ``meta['iteration']`` on every rank and publish it as the
    latest (steps 1-4 of the module docstring); returns its directory.

    Raises :class:`NonFiniteState` (nothing written) or :class:`SnapshotWriteError` (nothing
    left behind) on every rank alike.
    """
    serializer = DictionarySerializer()
    snapshot.serialize(serializer)
    arrays = serializer.target
    bad = non_finite_keys(arrays)
    listed = f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} not finite"
    problem = agreed_messages(comm, listed if bad else None)
    if problem is not None:
        raise NonFiniteState(problem)
    name = snapshot_name(meta["iteration"])
    final = os.path.join(out, name)
    partial = os.path.join(out, f".{name}.partial")
    error = None
    if comm.rank == 0:
        try:
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(partial)
        except OSError as caught:
            error = f"{partial}: {caught.strerror or caught}"
    error = comm.bcast_obj(error)
    if error is not None:
        raise SnapshotWriteError(f"could not write the snapshot: {error}; "
                                 f"{_previous(out)} stays the latest")
    path = rank_file(partial, comm.rank)
    record = None
    try:
        # uncompressed: K-FAC factors and inverses are large and compress poorly
        save_npz(path, _Arrays(arrays), compression=False)
        record = {"bytes": os.path.getsize(path), "sha256": file_sha256(path)}
    except OSError as caught:
        record = f"{os.path.join(final, rank_file_name(comm.rank))}: " \
                 f"{caught.strerror or caught}"
    records = comm.gather_obj(record)
    error = None
    if comm.rank == 0:
        failures = [r for r in records if isinstance(r, str)]
        try:
            if failures:
                error = "; ".join(failures)
            else:
                files = {rank_file_name(rank): r for rank, r in enumerate(records)}
                _publish(out, partial, final, sealed_meta({**meta, "files": files}))
                prune(out, keep)
        except OSError as caught:
            error = f"{caught.filename or out}: {caught.strerror or caught}"
        if error is not None:
            shutil.rmtree(partial, ignore_errors=True)
            if latest_name(out) != name:  # renamed into place, but never published
                shutil.rmtree(final, ignore_errors=True)
    error = comm.bcast_obj(error)
    if error is not None:
        raise SnapshotWriteError(f"could not write the snapshot at iteration "
                                 f"{meta['iteration']}: {error}; nothing of it was kept, and "
                                 f"{_previous(out)} stays the latest")
    return final


def _previous(out):
    latest = latest_name(out)
    return f"the previous snapshot {os.path.join(out, latest)}" if latest else \
        "no earlier snapshot (none had been written)"


def _publish(out, partial, final, meta):
    """Rank 0: ``meta.json`` into the complete ``partial`` folder, the folder into place,
    ``latest.json`` at it."""
    path = os.path.join(partial, META)
    try:
        atomic_write_text(path, json.dumps(meta, indent=1, sort_keys=True))
    except OSError as error:
        error.filename = os.path.join(final, META)
        raise
    if os.path.exists(final):  # a run started again with --overwrite, or resumed earlier
        shutil.rmtree(final)
    os.replace(partial, final)
    atomic_write_text(os.path.join(out, LATEST),
                      json.dumps({"snapshot": os.path.basename(final)}))


def latest_name(out):
    """The folder name ``out/latest.json`` names, or None (missing or unreadable)."""
    try:
        with open(os.path.join(out, LATEST), encoding="utf-8") as stream:
            name = json.load(stream)["snapshot"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) and SNAPSHOT_PATTERN.match(name) else None


def passed_validation(snapshot_dir):
    """Whether ``snapshot_dir`` has finite validation figures (:func:`mark_validated`)."""
    try:
        with open(os.path.join(snapshot_dir, VALIDATION), encoding="utf-8") as stream:
            figures = json.load(stream)
        return all(math.isfinite(value) for value in figures.values())
    except (OSError, ValueError, TypeError, AttributeError):
        return False


def mark_validated(snapshot_dir, figures):
    """Rank 0: record that the weights of ``snapshot_dir`` gave these finite validation
    ``figures`` (such a snapshot is never pruned until a newer one has passed)."""
    atomic_write_text(os.path.join(snapshot_dir, VALIDATION),
                      json.dumps(figures, indent=1, sort_keys=True))


def prune(out, keep):
    """Remove the snapshots of ``out`` but the newest ``keep``, the one ``latest.json``
    names and the newest that passed validation; also leftover partial folders."""
    snapshots = snapshots_in(out)
    kept = {directory for _, directory in snapshots[:keep]}
    latest = latest_name(out)
    if latest is not None:
        kept.add(os.path.join(out, latest))
    validated = next((d for _, d in snapshots if passed_validation(d)), None)
    if validated is not None:
        kept.add(validated)
    for _, directory in snapshots:
        if directory not in kept:
            shutil.rmtree(directory, ignore_errors=True)
    for name in os.listdir(out):
        if name.startswith(f".{SNAPSHOT_PREFIX}") and name.endswith(".partial"):
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)
