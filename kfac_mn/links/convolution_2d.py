"""2-D convolution layer."""
from kfac_mn import functions as F
from kfac_mn import initializers
from kfac_mn.link import Link
from kfac_mn.links.checks import check_pair, check_positive_int


class Convolution2D(Link):
    """Convolution2D(in_channels, out_channels, ksize=None, stride=1, pad=0, nobias=False,
    initialW=None, initial_bias=None).

    ``W`` has shape ``(out_channels, in_channels, kh, kw)``.  As in Chainer,
    ``Convolution2D(out_channels, ksize)`` (two arguments) defers
    ``in_channels`` to the first call.  ``ksize``, ``stride`` and ``pad`` are
    kept as ``(h, w)`` pairs; K-FAC reads them to build the same im2col
    patches as the convolution.  Defaults: LeCun-normal ``W``, zero ``b``.
    """

    def __init__(self, in_channels, out_channels, ksize=None, stride=1, pad=0, nobias=False,
                 initialW=None, initial_bias=None):
        super().__init__()
        if ksize is None:
            in_channels, out_channels, ksize = None, in_channels, out_channels
        self.out_channels = check_positive_int(out_channels, "Convolution2D out_channels")
        if in_channels is not None:
            in_channels = check_positive_int(in_channels, "Convolution2D in_channels")
        self.ksize = check_pair(ksize, "Convolution2D ksize", 1)
        self.stride = check_pair(stride, "Convolution2D stride", 1)
        self.pad = check_pair(pad, "Convolution2D pad", 0)
        self.add_param("W", None if in_channels is None else self._w_shape(in_channels),
                       initializer=initializers.get_initializer(
                           initialW, initializers.LeCunNormal()))
        if nobias:
            self.b = None
        else:
            self.add_param("b", (out_channels,), initializer=initializers.get_initializer(
                initial_bias, initializers.Zero()))

    @property
    def in_channels(self):
        """Number of input channels (``None`` until a lazy ``W`` is initialised)."""
        return None if self.W.data is None else self.W.shape[1]

    def _w_shape(self, in_channels):
        return (self.out_channels, in_channels) + self.ksize

    def forward(self, x):
        if x.ndim != 4:
            raise ValueError(
                f"Convolution2D {self.name!r}: expected an input of shape (N, C, H, W), "
                f"got {x.shape}")
        if self.W.data is None:
            self.initialize_param("W", self._w_shape(x.shape[1]))
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"Convolution2D {self.name!r}: expected {self.in_channels} input channels, "
                f"got an input of shape {x.shape}")
        return F.convolution_2d(x, self.W, self.b, stride=self.stride, pad=self.pad)
