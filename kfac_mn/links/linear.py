"""Fully connected layer y = x W^T + b."""
from kfac_mn import functions as F
from kfac_mn import initializers
from kfac_mn.link import Link
from kfac_mn.links.checks import check_positive_int


class Linear(Link):
    """Linear(in_size, out_size=None, nobias=False, initialW=None, initial_bias=None).

    ``W`` has shape ``(out_size, in_size)``, ``b`` shape ``(out_size,)``.
    ``Linear(10)`` or ``Linear(None, 10)`` defers ``in_size`` to the first
    call, where every axis after the first of the input is flattened.
    Defaults: LeCun-normal ``W``, zero ``b``.
    """

    def __init__(self, in_size, out_size=None, nobias=False, initialW=None, initial_bias=None):
        super().__init__()
        if out_size is None:
            in_size, out_size = None, in_size
        self.out_size = check_positive_int(out_size, "Linear out_size")
        if in_size is not None:
            in_size = check_positive_int(in_size, "Linear in_size")
        self.add_param("W", None if in_size is None else (out_size, in_size),
                       initializer=initializers.get_initializer(
                           initialW, initializers.LeCunNormal()))
        if nobias:
            self.b = None
        else:
            self.add_param("b", (out_size,), initializer=initializers.get_initializer(
                initial_bias, initializers.Zero()))

    @property
    def in_size(self):
        """Number of input features (``None`` until a lazy ``W`` is initialised)."""
        return None if self.W.data is None else self.W.shape[1]

    def forward(self, x):
        if x.ndim != 2:
            x = F.reshape(x, (x.shape[0], -1))
        if self.W.data is None:
            self.initialize_param("W", (self.out_size, x.shape[1]))
        if x.shape[1] != self.in_size:
            raise ValueError(
                f"Linear {self.name!r}: expected {self.in_size} input features, "
                f"got an input of shape {x.shape}")
        return F.linear(x, self.W, self.b)
