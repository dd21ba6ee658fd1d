"""Links with parameters (Chainer's ``chainer.links``)."""
from kfac_mn.links.batch_normalization import BatchNormalization  # noqa: F401
from kfac_mn.links.classifier import Classifier  # noqa: F401
from kfac_mn.links.convolution_2d import Convolution2D  # noqa: F401
from kfac_mn.links.linear import Linear  # noqa: F401
