"""Residual blocks and stages shared by every ResNet in ``models``.

Naming (what K-FAC paths show): the main path is ``conv1``, ``bn1``,
``conv2``, ``bn2`` (, ``conv3``, ``bn3`` in a bottleneck); a projection
shortcut takes the next number (``conv4``/``bn4`` in a bottleneck,
``conv3``/``bn3`` in a basic block), as in Chainer's ImageNet example.  A
block projects when it changes the resolution or the channel count; all
convolutions have no bias, are He-normal initialised (fan_in) and are
followed by batch normalization.
"""
from kfac_mn import functions as F
from kfac_mn import initializers
from kfac_mn import links as L
from kfac_mn.link import Chain, ChainList


def conv_bn(in_channels, out_channels, ksize, stride, pad):
    """A bias-free He-normal convolution and the BatchNormalization after it."""
    conv = L.Convolution2D(in_channels, out_channels, ksize, stride, pad, nobias=True,
                           initialW=initializers.HeNormal())
    return conv, L.BatchNormalization(out_channels)


class BottleneckBlock(Chain):
    """1x1 (channels) -> 3x3 (channels) -> 1x1 (4 * channels), plus the shortcut.

    ``stride_in_1x1=True`` puts the stride in ``conv1`` (ResNet v1, Chainer's
    ImageNet example, used by the paper's authors); ``False`` puts it in the
    3x3 ``conv2`` (ResNet v1.5, torchvision).  The parameter count is the same.
    """

    expansion = 4

    def __init__(self, in_channels, channels, stride=1, stride_in_1x1=True):
        super().__init__()
        out_channels = channels * self.expansion
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.projection = stride != 1 or in_channels != out_channels
        with self.init_scope():
            self.conv1, self.bn1 = conv_bn(in_channels, channels, 1, stride_1x1, 0)
            self.conv2, self.bn2 = conv_bn(channels, channels, 3, stride_3x3, 1)
            self.conv3, self.bn3 = conv_bn(channels, out_channels, 1, 1, 0)
            if self.projection:
                self.conv4, self.bn4 = conv_bn(in_channels, out_channels, 1, stride, 0)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        shortcut = self.bn4(self.conv4(x)) if self.projection else x
        return F.relu(h + shortcut)


class BasicBlock(Chain):
    """3x3 (channels, stride) -> 3x3 (channels), plus the shortcut (``conv3``/``bn3``)."""

    expansion = 1

    def __init__(self, in_channels, channels, stride=1):
        super().__init__()
        self.projection = stride != 1 or in_channels != channels
        with self.init_scope():
            self.conv1, self.bn1 = conv_bn(in_channels, channels, 3, stride, 1)
            self.conv2, self.bn2 = conv_bn(channels, channels, 3, 1, 1)
            if self.projection:
                self.conv3, self.bn3 = conv_bn(in_channels, channels, 1, stride, 0)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        shortcut = self.bn3(self.conv3(x)) if self.projection else x
        return F.relu(h + shortcut)


class ResidualStage(ChainList):
    """``n_blocks`` blocks; the first one strides (and projects), the others keep the shape."""

    def __init__(self, block, n_blocks, in_channels, channels, stride, **block_options):
        super().__init__()
        if n_blocks < 1:
            raise ValueError(f"a residual stage needs at least one block, got {n_blocks}")
        for i in range(n_blocks):
            self.add_link(block(in_channels, channels, stride if i == 0 else 1,
                                **block_options))
            in_channels = channels * block.expansion

    def forward(self, x):
        for block in self:
            x = block(x)
        return x
