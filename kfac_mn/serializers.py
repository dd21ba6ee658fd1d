"""Save and load links and optimizers as .npz files (Chainer's serialize protocol).

An object's ``serialize(serializer)`` calls ``serializer(key, value)`` for
each of its values and ``serializer[name]`` for a child, whose keys are then
prefixed with ``name/``.  The same method saves (a :class:`Serializer` stores
the value and returns it) and loads (a :class:`Deserializer` returns the
stored value, copying arrays in place).  Keys are '/'-joined paths without a
leading slash, e.g. ``res2/0/conv1/W``.

``None`` means "no value" (a lazy parameter not yet initialised): it is not
saved, and loading into ``None`` returns the stored array if the file has one.
"""
import os
import tempfile
import zipfile

import numpy

from kfac_mn import backend


class Serializer:
    """Base of the savers: ``serializer(key, value)`` records ``value`` and returns it."""


class Deserializer:
    """Base of the loaders: ``deserializer(key, value)`` returns the stored value."""


class DictionarySerializer(Serializer):
    """Collect values as host NumPy arrays in the dict ``target`` (shared by children)."""

    def __init__(self, target=None, path=""):
        self.target = {} if target is None else target
        self.path = path

    def __getitem__(self, key):
        return DictionarySerializer(self.target, self.path + key.strip("/") + "/")

    def __call__(self, key, value):
        if value is None:
            return None
        full_key = self.path + key
        if full_key in self.target:
            raise ValueError(f"serializer key {full_key!r} is written twice")
        self.target[full_key] = numpy.array(backend.to_cpu(value))
        return value


class NpzDeserializer(Deserializer):
    """Read values from an open ``numpy.load`` archive ``npz``.

    With ``strict`` a missing key is an error; :meth:`check_all_read` then
    reports keys that were never read.  ``file_name`` is used in messages.
    """

    def __init__(self, npz, path="", strict=True, file_name="<npz>", read_keys=None):
        self.npz = npz
        self.path = path
        self.strict = strict
        self.file_name = file_name
        self.read_keys = set() if read_keys is None else read_keys

    def __getitem__(self, key):
        return NpzDeserializer(self.npz, self.path + key.strip("/") + "/", self.strict,
                               self.file_name, self.read_keys)

    def __call__(self, key, value):
        full_key = self.path + key
        if full_key not in self.npz.files:
            if self.strict and value is not None:
                raise KeyError(f"{self.file_name}: key {full_key!r} is missing")
            return value
        self.read_keys.add(full_key)
        stored = self.npz[full_key]
        if value is None:
            return stored
        if isinstance(value, numpy.ndarray) or backend.is_gpu_array(value):
            if stored.shape != value.shape:
                raise ValueError(
                    f"{self.file_name}: key {full_key!r} has shape {stored.shape}, "
                    f"expected {value.shape}")
            xp = backend.get_array_module(value)
            value[...] = xp.asarray(stored, dtype=value.dtype)
            return value
        if stored.shape != ():
            raise ValueError(
                f"{self.file_name}: key {full_key!r} has shape {stored.shape}, "
                f"expected a scalar ({type(value).__name__})")
        return type(value)(stored.item())

    def check_all_read(self):
        """Raise if the archive has keys under this path that nobody read."""
        unread = sorted(k for k in self.npz.files
                        if k.startswith(self.path) and k not in self.read_keys)
        if unread:
            shown = ", ".join(repr(k) for k in unread[:10])
            more = f" and {len(unread) - 10} more" if len(unread) > 10 else ""
            raise ValueError(
                f"{self.file_name}: unexpected keys {shown}{more} (the file does not match "
                "the object it is loaded into; pass strict=False to ignore them)")


def save_npz(file, obj, compression=True):
    """Write ``obj.serialize`` output to the path ``file``, atomically.

    The archive is written to a temporary file in the same directory, synced,
    then renamed over ``file`` with ``os.replace``, so a crash leaves either
    the old file or the new one, never a partial one.
    """
    if not isinstance(file, (str, os.PathLike)):
        raise TypeError(f"save_npz needs a file path, got {type(file).__name__}")
    serializer = DictionarySerializer()
    obj.serialize(serializer)
    file = os.fspath(file)
    directory = os.path.dirname(os.path.abspath(file))
    fd, tmp_path = tempfile.mkstemp(
        prefix="." + os.path.basename(file) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            save = numpy.savez_compressed if compression else numpy.savez
            save(f, **serializer.target)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, file)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise


def load_npz(file, obj, path="", strict=True):
    """Load values saved by :func:`save_npz` into ``obj`` (a link or an optimizer).

    ``path`` selects a sub-tree of the archive (e.g. ``'model/'``).  With
    ``strict`` (the default) a missing key, an extra key under ``path`` or a
    shape mismatch raises an error naming the key and the file.
    """
    file_name = os.fspath(file) if isinstance(file, (str, os.PathLike)) else repr(file)
    try:
        npz = numpy.load(file, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"{file_name}: not a readable .npz archive ({exc})") from exc
    if not isinstance(npz, numpy.lib.npyio.NpzFile):
        raise ValueError(f"{file_name}: holds a single array, not an .npz archive")
    if path:
        path = path.strip("/") + "/"
    with npz:
        deserializer = NpzDeserializer(npz, path=path, strict=strict, file_name=file_name)
        obj.serialize(deserializer)
        if strict:
            deserializer.check_all_read()
