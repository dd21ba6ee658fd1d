"""FunctionHook: observe every function call, forward and backward.

A hook is activated with ``with hook:`` (or ``hook.add()`` / ``hook.delete()``)
and then sees every :class:`~kfac_mn.function_node.FunctionNode` that runs:

* ``forward_preprocess(function, in_data)`` / ``forward_postprocess(function, in_data)``
* ``backward_preprocess(function, in_data, out_grad)`` /
  ``backward_postprocess(function, in_data, out_grad)``

``in_data`` are the input arrays (in backward: those the function retained,
``None`` for the others) and ``out_grad`` the gradients of the function's
outputs.  K-FAC hangs on this to collect activations and output gradients
without touching the autograd.
"""
import threading

_local = threading.local()


def active_hooks():
    """The hooks active in this thread, in the order they were added."""
    hooks = getattr(_local, "hooks", None)
    if hooks is None:
        hooks = _local.hooks = []
    return hooks


class FunctionHook:
    name = "FunctionHook"

    def add(self):
        hooks = active_hooks()
        if self in hooks:
            raise RuntimeError(f"hook {self.name} is already active")
        hooks.append(self)
        return self

    def delete(self):
        active_hooks().remove(self)

    def __enter__(self):
        return self.add()

    def __exit__(self, *exc):
        self.delete()
        return False

    def forward_preprocess(self, function, in_data):
        pass

    def forward_postprocess(self, function, in_data):
        pass

    def backward_preprocess(self, function, in_data, out_grad):
        pass

    def backward_postprocess(self, function, in_data, out_grad):
        pass
