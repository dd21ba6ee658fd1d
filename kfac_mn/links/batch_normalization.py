"""Batch normalization layer with running statistics."""
import numpy

from kfac_mn import functions as F
from kfac_mn.configuration import config
from kfac_mn.link import Link
from kfac_mn.links.checks import check_positive_int
from kfac_mn.variable import Parameter


class BatchNormalization(Link):
    """BatchNormalization(size, decay=0.9, eps=2e-5, dtype=float32).

    Parameters ``gamma`` (ones) and ``beta`` (zeros) of shape ``(size,)``;
    persistent ``avg_mean`` (zeros) and ``avg_var`` (ones).  With
    ``config.train`` true it normalises with the batch statistics and updates
    the running ones in place (``avg <- decay * avg + (1 - decay) * batch``);
    otherwise it uses the running statistics.  Axis 1 of the input is the
    channel axis.
    """

    def __init__(self, size, decay=0.9, eps=2e-5, dtype=numpy.float32):
        super().__init__()
        self.size = check_positive_int(size, "BatchNormalization size")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"BatchNormalization decay must be in [0, 1], got {decay!r}")
        if not eps > 0.0:
            raise ValueError(f"BatchNormalization eps must be positive, got {eps!r}")
        self.decay = decay
        self.eps = eps
        dtype = numpy.dtype(dtype)
        self.add_persistent("avg_mean", numpy.zeros(size, dtype=dtype))
        self.add_persistent("avg_var", numpy.ones(size, dtype=dtype))
        with self.init_scope():
            self.gamma = Parameter(numpy.ones(size, dtype=dtype))
            self.beta = Parameter(numpy.zeros(size, dtype=dtype))

    def forward(self, x):
        if x.ndim < 2 or x.shape[1] != self.size:
            raise ValueError(
                f"BatchNormalization {self.name!r}: expected {self.size} channels on axis 1, "
                f"got an input of shape {x.shape}")
        if config.train:
            return F.batch_normalization(
                x, self.gamma, self.beta, eps=self.eps, running_mean=self.avg_mean,
                running_var=self.avg_var, decay=self.decay)
        return F.fixed_batch_normalization(
            x, self.gamma, self.beta, self.avg_mean, self.avg_var, eps=self.eps)
