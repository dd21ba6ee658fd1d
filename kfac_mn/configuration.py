"""Global switches, as in Chainer: ``config.train`` and ``config.enable_backprop``."""
import contextlib
import threading


class _Config(threading.local):
    def __init__(self):
        self.train = True
        self.enable_backprop = True


config = _Config()


@contextlib.contextmanager
def using_config(name, value):
    """Temporarily set ``config.<name>`` (e.g. ``using_config('train', False)``)."""
    if not hasattr(config, name):
        raise AttributeError(f"unknown configuration entry {name!r}")
    old = getattr(config, name)
    setattr(config, name, value)
    try:
        yield
    finally:
        setattr(config, name, old)


def no_backprop_mode():
    """Build no graph inside the block (inference, evaluation)."""
    return using_config("enable_backprop", False)
