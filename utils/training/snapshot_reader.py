"""Reading checkpoints back (the layout of :mod:`utils.training.checkpoint`): verified
against their checksums, falling back to the newest intact snapshot, on any number of ranks.

``--resume DIR`` names a snapshot folder or an output directory.  :func:`choose_snapshot`
tries, newest first, the snapshot ``latest.json`` names and then every other snapshot of the
directory: ``meta.json`` must parse and match its own checksum, and every rank file must
have the size and SHA-256 that ``meta.json`` records (the ranks share the files out, so each
file is read once).  The first intact one wins, and what was skipped is said.  A damaged
snapshot named explicitly is an error naming the file and the snapshot to use instead.

A snapshot written by P ranks can be loaded by Q ranks (:func:`load_snapshot`): everything
but the K-FAC state comes from the file of rank ``r mod P`` (the weights, momentum, schedule
and loader position are the same on every rank), and the factors and inverses of each layer
this rank owns now come from the file of the rank that owned it then (``meta.json``'s
``kfac_owners``, so a rank opens only the files it needs).
"""
import hashlib
import json
import os
import zipfile

import numpy

from kfac_mn.serializers import NpzDeserializer
from utils.training.agreement import agreed_messages
from utils.training.checkpoint import (
    LATEST,
    META,
    SNAPSHOT_PATTERN,
    file_sha256,
    latest_name,
    rank_file,
    rank_file_name,
    snapshots_in,
)

FISHER_PREFIX = "optimizer/fisher/"
#: per-rank state that is not carried to a rank that did not exist (its own stream instead)
RANK_OWN_KEYS = ("optimizer/rng_state",)


class DamagedSnapshot(ValueError):
    """A snapshot file is missing, unreadable or does not match its checksum."""


def read_meta(snapshot_dir):
    """``meta.json`` of ``snapshot_dir``, checked against its own checksum."""
    path = os.path.join(snapshot_dir, META)
    try:
        with open(path, encoding="utf-8") as stream:
            meta = json.load(stream)
    except FileNotFoundError:
        raise DamagedSnapshot(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DamagedSnapshot(f"{path}: cannot read it ({error})") from None
    except json.JSONDecodeError as error:
        raise DamagedSnapshot(f"{path}: not valid JSON ({error})") from None
    if isinstance(meta, dict) and "iteration" in meta and "checksum" not in meta:
        raise DamagedSnapshot(f"{path}: written by an earlier version of train_imagenet.py, "
                              "without checksums; it cannot be verified or resumed")
    if not isinstance(meta, dict) or "checksum" not in meta or "files" not in meta:
        raise DamagedSnapshot(f"{path}: not a snapshot's metadata (no checksum or files)")
    body = {key: value for key, value in meta.items() if key != "checksum"}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()
    if digest != meta["checksum"]:
        raise DamagedSnapshot(f"{path}: its contents do not match its checksum (edited or "
                              "damaged)")
    return meta


def verify_files(snapshot_dir, meta, ranks):
    """Raise :class:`DamagedSnapshot` naming the first of the rank files ``ranks`` that is
    missing or whose size or SHA-256 differs from ``meta.json``'s record."""
    for rank in ranks:
        path = rank_file(snapshot_dir, rank)
        record = meta["files"].get(rank_file_name(rank))
        if record is None:
            raise DamagedSnapshot(f"{os.path.join(snapshot_dir, META)} records no "
                                  f"{rank_file_name(rank)}")
        try:
            size = os.path.getsize(path)
            if size != record["bytes"]:
                raise DamagedSnapshot(f"{path} has {size} bytes, {record['bytes']} were "
                                      "written (truncated or damaged)")
            if file_sha256(path) != record["sha256"]:
                raise DamagedSnapshot(f"{path}: its SHA-256 differs from the one recorded "
                                      "when it was written (damaged)")
        except FileNotFoundError:
            raise DamagedSnapshot(f"{path} is missing") from None
        except OSError as error:
            raise DamagedSnapshot(f"{path}: cannot read it ({error.strerror})") from None


def _candidates(path):
    """``(explicit, directories)``: the snapshots ``--resume path`` may mean, best first."""
    if os.path.isfile(os.path.join(path, META)) or SNAPSHOT_PATTERN.match(
            os.path.basename(os.path.normpath(path))):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--resume {path}: no such directory")
        return True, [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--resume {path}: no such directory")
    ordered = [directory for _, directory in snapshots_in(path)]
    latest = latest_name(path)
    if latest is not None and os.path.join(path, latest) in ordered:
        ordered.remove(os.path.join(path, latest))
        ordered.insert(0, os.path.join(path, latest))
    if not ordered:
        raise FileNotFoundError(f"--resume {path}: no checkpoint there (neither {META} of a "
                                f"snapshot nor snapshot folders with a {LATEST})")
    return False, ordered


def _intact(directory, comm):
    """``(meta, None)`` if every rank finds its share of ``directory`` intact, else
    ``(None, what is wrong)``, the same on every rank."""
    meta = error = None
    try:
        meta = read_meta(directory)
        verify_files(directory, meta, range(comm.rank, meta["size"], comm.size))
    except DamagedSnapshot as caught:
        error = str(caught)
    error = agreed_messages(comm, error, by_rank=False)
    return (None, error) if error is not None else (meta, None)


def choose_snapshot(path, comm):
    """``(snapshot_dir, meta, skipped)`` for ``--resume path`` on every rank: the newest
    intact snapshot, ``skipped`` the damaged ones passed over (messages).  Raises
    :class:`DamagedSnapshot` or FileNotFoundError, naming the files, on every rank alike."""
    explicit, directories = _candidates(path)
    skipped = []
    for directory in directories:
        meta, error = _intact(directory, comm)
        if error is None:
            return directory, meta, skipped
        skipped.append(error)
        if explicit:
            parent = os.path.dirname(os.path.abspath(directory))
            others = [d for _, d in snapshots_in(parent)
                      if os.path.abspath(d) != os.path.abspath(directory)]
            instead = next((d for d in others if _intact(d, comm)[1] is None), None)
            advice = (f"use --resume {instead} (the newest intact snapshot) instead"
                      if instead else f"no intact snapshot is left in {parent}")
            raise DamagedSnapshot(f"--resume {path}: {error}; {advice}")
    raise DamagedSnapshot(f"--resume {path}: no intact snapshot there: "
                          + "; ".join(skipped))


# -- loading on any number of ranks ------------------------------------------------------------
def _layer_of(key):
    """The layer path of a K-FAC state key ``optimizer/fisher/<layer>/<name>``."""
    return key[len(FISHER_PREFIX):].rsplit("/", 1)[0]


class MergedArchive:
    """The arrays one rank loads, looked up in the files of the snapshot's ranks (what
    :class:`~kfac_mn.serializers.NpzDeserializer` reads from: ``files`` and ``[key]``)."""

    def __init__(self, snapshot_dir, saved_size, rank, owns, old_owners=None):
        self.snapshot_dir = snapshot_dir
        self._open = {}
        base = rank % saved_size
        self._source = {}
        for key in self._archive(base).files:
            if key.startswith(FISHER_PREFIX) or (rank >= saved_size and key in RANK_OWN_KEYS):
                continue
            self._source[key] = base
        sources = range(saved_size)
        if old_owners is not None:  # only the files of our layers' old owners
            sources = sorted({owner for layer, owner in old_owners.items() if owns(layer)})
        for source in sources:
            for key in self._archive(source).files:
                if key.startswith(FISHER_PREFIX) and owns(_layer_of(key)):
                    self._source.setdefault(key, source)
        self.files = sorted(self._source)

    def _archive(self, source):
        if source not in self._open:
            path = rank_file(self.snapshot_dir, source)
            try:
                self._open[source] = numpy.load(path, allow_pickle=False)
            except (ValueError, OSError, zipfile.BadZipFile) as error:
                raise DamagedSnapshot(f"{path}: not a readable .npz archive ({error})") \
                    from None
        return self._open[source]

    def __getitem__(self, key):
        return self._archive(self._source[key])[key]

    def close(self):
        for archive in self._open.values():
            archive.close()
        self._open = {}


def load_snapshot(snapshot_dir, meta, rank, snapshot, owns=None):
    """Fill ``snapshot`` (a :class:`~utils.training.checkpoint.RankSnapshot`) as rank
    ``rank`` of any world size; ``owns(layer path)`` says which K-FAC layers' factors and
    inverses this rank keeps (default: all).  Returns the stored ``state``."""
    archive = MergedArchive(snapshot_dir, meta["size"], rank,
                            owns if owns is not None else (lambda layer: True),
                            meta.get("kfac_owners"))
    try:
        deserializer = NpzDeserializer(archive, file_name=os.path.join(
            snapshot_dir, rank_file_name(rank % meta["size"])))
        snapshot.serialize(deserializer)
        deserializer.check_all_read()
    finally:
        archive.close()
    return snapshot.state
