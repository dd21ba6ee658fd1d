"""Optimizer framework (Chainer's Optimizer, UpdateRule, Hyperparameter, GradientMethod).

An :class:`Optimizer` is attached to a link with :meth:`Optimizer.setup`.  A
:class:`GradientMethod` gives every parameter an :class:`UpdateRule` that holds
the parameter's optimizer state (e.g. the momentum buffer) and hyperparameters.
A rule's :class:`Hyperparameter` falls back to the optimizer's, which falls
back to the method's defaults, so ``optimizer.lr = x`` changes every rule that
has no value of its own.

Every optimizer takes its gradients one way (:meth:`Optimizer.compute_gradients`): from one
batch, ``update(lossfun, x, t)``, or accumulated over micro-batches,
``update(lossfun, MicroBatches([(x_0, t_0), (x_1, t_1)]))``.
"""
import numpy

from kfac_mn.link import Link
from kfac_mn.serializers import Deserializer
from kfac_mn.variable import Variable


class Hyperparameter:
    """A set of named values with a parent to look up the values it does not set."""

    def __init__(self, parent=None):
        self._parent = parent

    def __getattr__(self, name):
        if name.startswith("__") or "_parent" not in self.__dict__:
            raise AttributeError(name)
        if self._parent is None:
            raise AttributeError(f"hyperparameter {name!r} is not defined")
        return getattr(self._parent, name)

    @property
    def parent(self):
        return self._parent

    def get_dict(self):
        """All values visible here (own ones over inherited ones), sorted by name."""
        values = {} if self._parent is None else self._parent.get_dict()
        values.update((k, v) for k, v in self.__dict__.items() if k != "_parent")
        return dict(sorted(values.items()))

    def __repr__(self):
        return f"Hyperparameter({self.get_dict()})"


class HyperparameterProxy:
    """Class attribute that exposes ``optimizer.hyperparam.<name>`` as ``optimizer.<name>``."""

    def __init__(self, name):
        self.name = name
        self.__doc__ = f"Alias of ``self.hyperparam.{name}``."

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        return getattr(obj.hyperparam, self.name)

    def __set__(self, obj, value):
        setattr(obj.hyperparam, self.name, value)


class UpdateRule:
    """Update of one parameter: its ``state``, step count ``t`` and ``hyperparam``.

    Subclasses define :meth:`init_state` (create the state arrays, on the
    parameter's device and in its dtype) and :meth:`update_core`.  A rule with
    ``enabled = False`` leaves its parameter unchanged.
    """

    def __init__(self, parent_hyperparam=None):
        self.hyperparam = Hyperparameter(parent_hyperparam)
        self.t = 0
        self.state = None
        self.enabled = True

    def init_state(self, param):
        """Fill ``self.state`` (a dict) for ``param``; the default has no state."""

    def ensure_state(self, param):
        """Create the state on first use, once ``param`` has an array."""
        if self.state is None and param.data is not None:
            self.state = {}
            self.init_state(param)

    def update(self, param):
        """Apply one step to ``param`` (no-op if disabled or not initialised)."""
        if not self.enabled or param.data is None:
            return
        self.ensure_state(param)
        self.t += 1
        self.update_core(param)

    def update_core(self, param):
        raise NotImplementedError(f"{type(self).__name__} must define update_core")

    def serialize(self, serializer):
        """Save or load ``t`` and the state arrays (sorted by name)."""
        self.t = serializer("t", self.t)
        if self.state is not None:
            for key in sorted(self.state):
                self.state[key] = serializer(key, self.state[key])


class MicroBatches:
    """The ``lossfun`` arguments of the k micro-batches of one update (``--acc-iters k``).

    ``optimizer.update(lossfun, MicroBatches([(x_0, t_0), (x_1, t_1)]))`` runs forward and
    backward on each micro-batch in turn; the gradients of the k mean losses are summed and
    divided by k (K-FAC's statistic sums and counts simply add up over them too).  With equal
    micro-batches of b examples this is the update of one batch of k b examples, for any layer
    whose output does not depend on the other examples of its batch (batch normalization
    computes its statistics per micro-batch).  The loss returned is the mean of the k losses.
    """

    def __init__(self, batches):
        self.batches = [tuple(batch) for batch in batches]
        if not self.batches:
            raise ValueError("MicroBatches needs at least one micro-batch")


class Optimizer:
    """Base optimizer: target link, step count ``t``, ``epoch`` and hooks.

    Hooks are callables ``hook(optimizer)`` run before (``'pre'``) or after
    (``'post'``) the parameter updates, in the order they were added.
    """

    def __init__(self):
        self.target = None
        self.t = 0
        self.epoch = 0
        self._hooks = {"pre": {}, "post": {}}

    def setup(self, link):
        """Attach to ``link`` and reset ``t`` and ``epoch``; returns ``self``."""
        if not isinstance(link, Link):
            raise TypeError(f"Optimizer.setup needs a Link, got {type(link).__name__}")
        self.target = link
        self.t = 0
        self.epoch = 0
        return self

    def _check_setup(self):
        if self.target is None:
            raise RuntimeError(f"{type(self).__name__}: call setup(link) first")

    def new_epoch(self):
        self.epoch += 1

    def add_hook(self, hook, name=None, timing=None):
        """Register ``hook`` under ``name`` (default: ``hook.name`` or its class name).

        ``timing`` is ``'pre'`` (before the updates, e.g. weight decay on the
        gradients) or ``'post'`` (after them); default: ``hook.timing`` if it
        has one, else ``'pre'``.
        """
        if not callable(hook):
            raise TypeError(f"optimizer hook must be callable, got {type(hook).__name__}")
        if name is None:
            name = getattr(hook, "name", type(hook).__name__)
        if timing is None:
            timing = getattr(hook, "timing", "pre")
        if timing not in self._hooks:
            raise ValueError(f"hook {name!r}: timing must be 'pre' or 'post', got {timing!r}")
        if any(name in hooks for hooks in self._hooks.values()):
            raise KeyError(f"an optimizer hook named {name!r} is already added")
        self._hooks[timing][name] = hook

    def remove_hook(self, name):
        for hooks in self._hooks.values():
            if name in hooks:
                del hooks[name]
                return
        raise KeyError(f"no optimizer hook named {name!r}")

    def call_hooks(self, timing):
        for hook in list(self._hooks[timing].values()):
            hook(self)

    def compute_gradients(self, lossfun, *args, **kwds):
        """Clear the gradients, then forward and backward ``loss = lossfun(*args, **kwds)``
        (each loss is cut from its graph, freeing it); returns the loss.

        ``args`` may be a single :class:`MicroBatches`: then every micro-batch adds to the
        gradients, which are divided by their number, and the mean loss is returned.
        """
        self.target.cleargrads()
        if not (len(args) == 1 and isinstance(args[0], MicroBatches)):
            return self.backward_batch(lossfun, args, kwds)
        batches = args[0].batches
        losses = [self.backward_batch(lossfun, batch, kwds) for batch in batches]
        for param in self.target.params(include_uninit=False):
            if param.grad is not None:
                param.grad /= param.grad.dtype.type(len(batches))
        xp = self.target.xp
        return Variable(xp.mean(xp.stack([loss.data for loss in losses])), requires_grad=False)

    def backward_batch(self, lossfun, args, kwds):
        """Forward and backward of one (micro-)batch, adding to the gradients."""
        loss = lossfun(*args, **kwds)
        loss.backward()
        loss.unchain()
        return loss

    def update(self, lossfun=None, *args, **kwds):
        """One step.

        With ``lossfun``: :meth:`compute_gradients`.  Then, as in Chainer, give a zero
        gradient to every initialised parameter that has none, run the 'pre' hooks, count
        the step (``t += 1``), update the parameters and run the 'post' hooks.  Returns the
        loss (``None`` without ``lossfun``).
        """
        self._check_setup()
        loss = None
        if lossfun is not None:
            loss = self.compute_gradients(lossfun, *args, **kwds)
        for param in self.target.params(include_uninit=False):
            if param.grad is None:
                param.grad = param.xp.zeros_like(param.data)
        self.call_hooks("pre")
        self.t += 1
        self.update_core()
        self.call_hooks("post")
        return loss

    def update_core(self):
        raise NotImplementedError(f"{type(self).__name__} must define update_core")

    def serialize(self, serializer):
        """Save or load ``t`` and ``epoch``."""
        self._check_setup()
        self.t = serializer("t", self.t)
        self.epoch = serializer("epoch", self.epoch)


class GradientMethod(Optimizer):
    """An optimizer that updates each parameter with its own :class:`UpdateRule`.

    Serialized keys: ``t``, ``epoch``, ``hyperparam/<name>`` for the
    optimizer's own hyperparameters (so a schedule's current ``lr`` is
    restored), and ``<param path>/t`` plus ``<param path>/<state>`` for each
    rule, e.g. ``res2/0/conv1/W/v``.  Values a rule overrides in its own
    ``hyperparam`` are not saved.
    """

    def __init__(self):
        super().__init__()
        self.hyperparam = Hyperparameter()

    def setup(self, link):
        super().setup(link)
        for param in link.params():
            param.update_rule = self.create_update_rule()
        return self

    def create_update_rule(self):
        raise NotImplementedError(f"{type(self).__name__} must define create_update_rule")

    def update_core(self):
        for path, param in self.target.namedparams():
            if param.update_rule is None:
                raise RuntimeError(
                    f"parameter {path} has no update rule: it was added after "
                    f"{type(self).__name__}.setup; call setup again")
            param.update_rule.update(param)

    def serialize(self, serializer):
        super().serialize(serializer)
        own = {k: v for k, v in self.hyperparam.__dict__.items() if k != "_parent"}
        hyper = serializer["hyperparam"]
        for name in sorted(own):
            setattr(self.hyperparam, name, hyper(name, own[name]))
        loading = isinstance(serializer, Deserializer)
        for path, param in self.target.namedparams():
            if param.update_rule is None:
                continue
            if loading and param.data is None:
                raise ValueError(
                    f"cannot load the optimizer state of {path}: the parameter is not "
                    "initialised; load the model (or run one forward pass) first")
            param.update_rule.ensure_state(param)
            param.update_rule.serialize(serializer[path])


def as_param_dtype(value, param):
    """``value`` as a scalar of the parameter's dtype, so update math never upcasts."""
    return numpy.dtype(param.data.dtype).type(value)
