"""Links own parameters and persistent values (Chainer's Link, Chain, ChainList).

Paths name everything in a model: the root link is ``'/'``, a child ``conv1``
of the root is ``'/conv1'``, its weight ``'/conv1/W'``; children of a
:class:`ChainList` are named ``'0'``, ``'1'``, ...  Every listing
(``params``, ``namedparams``, ``links``, ``namedlinks``, ``children``) is
sorted by :func:`path_key`: component by component, numbers as numbers
(``'/res2/9'`` comes before ``'/res2/10'``), names as strings, and a link
before everything below it.  The order never depends on the order in which
attributes were assigned.
"""
import contextlib
import warnings

import numpy

from kfac_mn import backend, initializers
from kfac_mn.variable import Parameter


def path_key(path):
    """Sort key of a '/'-separated path; numeric components compare as integers."""
    return tuple((0, int(part), "") if part.isdecimal() else (1, 0, part)
                 for part in path.split("/") if part)


def _join(prefix, name):
    return prefix + "/" + name if prefix != "/" else "/" + name


class Link:
    """A building block that owns parameters and persistent values.

    Assigning a :class:`~kfac_mn.variable.Parameter` inside ``with
    self.init_scope():`` registers it; :meth:`add_param` does the same and can
    defer the shape (lazy initialisation at the first call, see
    :meth:`initialize_param`).  Persistent values (arrays or scalars saved by
    the serializers but not trained, e.g. BatchNormalization's running
    statistics) are registered with :meth:`add_persistent`.

    K-FAC finds the layer of a parameter with :meth:`param_owners`.
    """

    def __init__(self):
        self._params = []
        self._persistent = []
        self._param_initializers = {}
        self._within_init_scope = False
        self._on_gpu = False
        self._gpu_device = None
        self.name = None

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward")

    # -- registration -------------------------------------------------------
    @property
    def within_init_scope(self):
        return getattr(self, "_within_init_scope", False)

    @contextlib.contextmanager
    def init_scope(self):
        """Inside this block, assigning a Parameter (or, in a Chain, a Link) registers it."""
        old = self.within_init_scope
        object.__setattr__(self, "_within_init_scope", True)
        try:
            yield
        finally:
            object.__setattr__(self, "_within_init_scope", old)

    def __setattr__(self, name, value):
        if self.within_init_scope and isinstance(value, Parameter):
            self._check_free(name)
            value.name = name
            self._params.append(name)
        elif self.within_init_scope and isinstance(value, Link):
            raise TypeError(
                f"cannot register link {name!r} in a {type(self).__name__}: only a Chain "
                "holds named child links (use ChainList.add_link for a list)")
        super().__setattr__(name, value)

    def __delattr__(self, name):
        if name in self._params:
            self._params.remove(name)
            self._param_initializers.pop(name, None)
        elif name in self._persistent:
            self._persistent.remove(name)
        super().__delattr__(name)

    def _check_free(self, name):
        if name in self.__dict__:
            raise AttributeError(
                f"{type(self).__name__} already has an attribute {name!r}; "
                "a parameter, persistent value or child link needs a free name")

    def add_param(self, name, shape=None, dtype=None, initializer=None):
        """Register a parameter ``name``; with ``shape=None`` it stays uninitialised.

        ``initializer`` (default: zeros) fills the array now or, for a lazy
        parameter, in :meth:`initialize_param`.  ``dtype`` defaults to the
        initializer's dtype, else float32.
        """
        self._check_free(name)
        if initializer is None:
            initializer = initializers.Zero()
        self._param_initializers[name] = (initializer, dtype)
        with self.init_scope():
            setattr(self, name, Parameter())
        if shape is not None:
            self.initialize_param(name, shape)

    def initialize_param(self, name, shape):
        """Create the array of the registered parameter ``name`` on this link's device."""
        if name not in self._param_initializers:
            raise KeyError(f"{type(self).__name__} has no lazily initialised parameter {name!r}")
        initializer, dtype = self._param_initializers[name]
        data = initializers.generate_array(initializer, tuple(shape), dtype)
        getattr(self, name).initialize(self._to_device(data))

    def add_persistent(self, name, value):
        """Register a value (array or scalar) that serializers save and load."""
        self._check_free(name)
        object.__setattr__(self, name, value)
        self._persistent.append(name)

    # -- traversal ----------------------------------------------------------
    def _named_children(self):
        """``(name, link)`` of the direct children, in any order."""
        return ()

    def children(self):
        for _, child in sorted(self._named_children(), key=lambda item: path_key(item[0])):
            yield child

    def namedlinks(self, skipself=False):
        """``(path, link)`` of this link (path ``'/'``) and all links below it, sorted."""
        found = []
        stack = [("/", self)]
        while stack:
            path, link = stack.pop()
            found.append((path, link))
            stack.extend((_join(path, name), child) for name, child in link._named_children())
        found.sort(key=lambda item: path_key(item[0]))
        return found[1:] if skipself else found

    def links(self, skipself=False):
        return [link for _, link in self.namedlinks(skipself)]

    def namedparams(self, include_uninit=True):
        """``(path, param)`` of every parameter in the tree, sorted by path."""
        found = []
        for link_path, link in self.namedlinks():
            for name in link._params:
                param = link.__dict__[name]
                if include_uninit or param.data is not None:
                    found.append((_join(link_path, name), param))
        found.sort(key=lambda item: path_key(item[0]))
        return found

    def params(self, include_uninit=True):
        return [param for _, param in self.namedparams(include_uninit)]

    def param_owners(self):
        """Map each Parameter to ``(link_path, link)`` of the link that owns it.

        A function hook that sees a parameter's node (``node.get_variable_or_none()``)
        uses this to find the layer, e.g. ``'/res2/0/conv1'`` and its
        Convolution2D with its ``stride`` and ``pad``.
        """
        return {link.__dict__[name]: (link_path, link)
                for link_path, link in self.namedlinks() for name in link._params}

    def cleargrads(self):
        for param in self.params():
            param.cleargrad()

    def count_params(self):
        """Number of scalars in all initialised parameters (warns about lazy ones)."""
        total = 0
        for path, param in self.namedparams():
            if param.data is None:
                warnings.warn(f"parameter {path} is not initialised and is not counted",
                              stacklevel=2)
            else:
                total += param.data.size
        return total

    # -- devices ------------------------------------------------------------
    @property
    def xp(self):
        return backend.cupy if self._on_gpu else numpy

    def _to_device(self, array):
        return backend.to_gpu(array, self._gpu_device) if self._on_gpu else array

    def to_gpu(self, device=None):
        """Move every parameter and persistent array of the tree to the GPU."""
        for link in self.links():
            for name in link._params:
                link.__dict__[name].to_gpu(device)
            for name in link._persistent:
                value = link.__dict__[name]
                if isinstance(value, numpy.ndarray):
                    object.__setattr__(link, name, backend.to_gpu(value, device))
            link._on_gpu = True
            link._gpu_device = device
        return self

    def to_cpu(self):
        """Move every parameter and persistent array of the tree to host memory."""
        for link in self.links():
            for name in link._params:
                link.__dict__[name].to_cpu()
            for name in link._persistent:
                value = link.__dict__[name]
                if backend.is_gpu_array(value):
                    object.__setattr__(link, name, backend.to_cpu(value))
            link._on_gpu = False
            link._gpu_device = None
        return self

    # -- serialization ------------------------------------------------------
    def serialize(self, serializer):
        """Save or load parameters and persistent values (sorted by name), then children.

        A lazy parameter that is still uninitialised is skipped when saving and
        created from the file when loading.
        """
        for name in sorted(self._params):
            param = self.__dict__[name]
            value = serializer(name, param.data)
            if param.data is None and value is not None:
                param.initialize(self._to_device(value))
        for name in sorted(self._persistent):
            object.__setattr__(self, name, serializer(name, self.__dict__[name]))
        for name, child in sorted(self._named_children(), key=lambda item: path_key(item[0])):
            child.serialize(serializer[name])


class Chain(Link):
    """A link whose children are links assigned by name inside ``init_scope``."""

    def __init__(self):
        super().__init__()
        self._children = []

    def __setattr__(self, name, value):
        if self.within_init_scope and isinstance(value, Link):
            self._check_free(name)
            value.name = name
            self._children.append(name)
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def __delattr__(self, name):
        if name in self._children:
            self._children.remove(name)
        super().__delattr__(name)

    def __getitem__(self, name):
        if name not in self._children:
            raise KeyError(f"{type(self).__name__} has no child link {name!r}")
        return self.__dict__[name]

    def add_link(self, name, link):
        """Register ``link`` as the child ``name`` (same as assigning it in init_scope)."""
        if not isinstance(link, Link):
            raise TypeError(f"child {name!r} must be a Link, got {type(link).__name__}")
        with self.init_scope():
            setattr(self, name, link)

    def _named_children(self):
        return [(name, self.__dict__[name]) for name in self._children]


class ChainList(Link):
    """A link holding a list of child links named '0', '1', ... in order of addition."""

    def __init__(self, *links):
        super().__init__()
        self._children = []
        for link in links:
            self.add_link(link)

    def add_link(self, link):
        if not isinstance(link, Link):
            raise TypeError(f"ChainList children must be Links, got {type(link).__name__}")
        link.name = str(len(self._children))
        self._children.append(link)

    append = add_link

    def __getitem__(self, index):
        return self._children[index]

    def __iter__(self):
        return iter(self._children)

    def __len__(self):
        return len(self._children)

    def _named_children(self):
        return [(str(i), link) for i, link in enumerate(self._children)]
