"""``train_imagenet.py`` with one more architecture, ``no_bn_float64``: a float64 network
without batch normalization (conv -> relu -> pooling -> linear), registered in ``models.archs``
as a user registers a model.  Without batch normalization (and in float64) the updates of a
global batch do not depend on how the ranks and micro-batches split it, so a run resumed on
another number of ranks must continue the same run to rounding."""
import sys

import numpy as np

import train_imagenet
from kfac_mn import Chain
from kfac_mn import functions as F
from kfac_mn import links as L
from models import archs


class NoBatchNormFloat64(Chain):
    def __init__(self, n_class=10, in_channels=1):
        super().__init__()
        with self.init_scope():
            self.conv = L.Convolution2D(in_channels, 4, 3, 2, 1)
            self.fc = L.Linear(4 * 7 * 7, n_class)
        for param in self.params():
            param.data = param.data.astype(np.float64)

    def forward(self, x):
        x = x.astype(np.float64)
        return self.fc(F.relu(F.average_pooling_2d(self.conv(x), 2)))


archs["no_bn_float64"] = NoBatchNormFloat64

if __name__ == "__main__":
    sys.exit(train_imagenet.main())
