"""Differentiable functions, with Chainer's names and argument order."""
from kfac_mn.functions.accuracy import accuracy  # noqa: F401
from kfac_mn.functions.average_pooling_2d import (  # noqa: F401
    AveragePooling2D,
    GlobalAveragePooling2D,
    average_pooling_2d,
    global_average_pooling_2d,
)
from kfac_mn.functions.basic_math import (  # noqa: F401
    add,
    div,
    get_item,
    mean,
    mul,
    neg,
    pow_const,
    reshape,
    sub,
    sum,
    transpose,
)
from kfac_mn.functions.batch_normalization import (  # noqa: F401
    BatchNormalization,
    FixedBatchNormalization,
    batch_normalization,
    fixed_batch_normalization,
)
from kfac_mn.functions.convolution_2d import Convolution2DFunction, convolution_2d  # noqa: F401
from kfac_mn.functions.linear import LinearFunction, linear  # noqa: F401
from kfac_mn.functions.max_pooling_2d import MaxPooling2D, max_pooling_2d  # noqa: F401
from kfac_mn.functions.patches import col2im, im2col  # noqa: F401
from kfac_mn.functions.relu import ReLU, relu  # noqa: F401
from kfac_mn.functions.softmax import LogSoftmax, Softmax, log_softmax, softmax  # noqa: F401
from kfac_mn.functions.softmax_cross_entropy import SoftmaxCrossEntropy, softmax_cross_entropy  # noqa: F401
