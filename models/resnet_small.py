"""Small ResNets that train on a CPU: CIFAR-style (32x32) and a tiny one for MNIST (28x28).

Layout: ``conv1`` (3x3, stride 1) -> ``bn1`` -> ReLU -> ``res2``, ``res3``,
... (ChainLists of basic blocks) -> global average pooling -> ``fc``.

The CIFAR-style networks are He et al.'s depth 6n+2 (3 stages of n basic
blocks, 16/32/64 channels, strides 1/2/2), except that the shortcuts that
change shape are 1x1 convolutions with batch normalization (option B)
instead of zero padding (option A), so K-FAC sees them as ordinary layers.
"""
from kfac_mn import functions as F
from kfac_mn import links as L
from kfac_mn.link import Chain
from models.resnet_blocks import BasicBlock, ResidualStage, conv_bn


class ResNetSmall(Chain):
    """ResNet of basic blocks: stage ``i`` has ``stage_blocks[i]`` blocks of
    ``stage_channels[i]`` channels, its first block striding by ``stage_strides[i]``.
    The stem ``conv1`` has ``stage_channels[0]`` channels."""

    def __init__(self, stage_channels, stage_blocks, stage_strides, n_class, in_channels,
                 insize):
        super().__init__()
        if not len(stage_channels) == len(stage_blocks) == len(stage_strides):
            raise ValueError(
                "stage_channels, stage_blocks and stage_strides need the same length, got "
                f"{stage_channels!r}, {stage_blocks!r}, {stage_strides!r}")
        self.insize = insize
        with self.init_scope():
            self.conv1, self.bn1 = conv_bn(in_channels, stage_channels[0], 3, 1, 1)
            channels_in = stage_channels[0]
            for index, (channels, n_blocks, stride) in enumerate(
                    zip(stage_channels, stage_blocks, stage_strides)):
                setattr(self, f"res{index + 2}",
                        ResidualStage(BasicBlock, n_blocks, channels_in, channels, stride))
                channels_in = channels
            self.fc = L.Linear(channels_in, n_class)
        self.n_stages = len(stage_channels)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        for index in range(self.n_stages):
            h = self[f"res{index + 2}"](h)
        return self.fc(F.global_average_pooling_2d(h))


def cifar_resnet(depth, n_class=10, in_channels=3):
    """He et al.'s CIFAR ResNet of ``depth = 6n + 2`` layers (16/32/64 channels)."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, ...), "
                         f"got {depth}")
    n = (depth - 2) // 6
    return ResNetSmall((16, 32, 64), (n, n, n), (1, 2, 2), n_class, in_channels, insize=32)


def resnet_mnist(n_class=10, in_channels=1):
    """Tiny ResNet for 28x28 MNIST: stem 16 channels at 28x28, then one basic block
    of 16 channels at 14x14 and one of 32 at 7x7 (about 20k parameters, 1.8M
    multiply-adds per image), so that it trains in minutes on two CPU cores."""
    return ResNetSmall((16, 32), (1, 1), (2, 2), n_class, in_channels, insize=28)
