"""ImageNet ResNets (He et al. 2016): ResNet-50 as the paper trains it, and ResNet-18.

Layout: ``conv1`` (7x7/2, 64) -> ``bn1`` -> ReLU -> 3x3/2 max pooling ->
``res2`` .. ``res5`` (ChainLists of blocks, 64/128/256/512 channels, stride
1/2/2/2) -> global average pooling -> ``fc`` (with bias).  K-FAC paths look
like ``/res2/0/conv1``.

Differences from Chainer's ImageNet example (the authors' code), none of
which changes the parameters: ``conv1`` has no bias (the example's has one;
without it ResNet-50 has the standard 25,557,032 parameters); the max pooling
pads by 1 with floor rounding (torchvision) instead of Chainer's
``cover_all`` ceil rounding without padding (both give 56x56 at 224x224);
global average pooling replaces the 7x7 average pooling (the same at
224x224, and valid at other sizes).
"""
from kfac_mn import functions as F
from kfac_mn import links as L
from kfac_mn.link import Chain
from models.resnet_blocks import BasicBlock, BottleneckBlock, ResidualStage, conv_bn

STAGE_CHANNELS = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 2, 2)


class ResNetImageNet(Chain):
    """ResNet for 224x224 inputs; ``block_options`` go to every block (e.g. stride_in_1x1)."""

    insize = 224

    def __init__(self, block, stage_blocks, n_class=1000, in_channels=3, **block_options):
        super().__init__()
        if len(stage_blocks) != len(STAGE_CHANNELS):
            raise ValueError(f"stage_blocks needs {len(STAGE_CHANNELS)} entries, "
                             f"got {stage_blocks!r}")
        with self.init_scope():
            self.conv1, self.bn1 = conv_bn(in_channels, STAGE_CHANNELS[0], 7, 2, 3)
            channels_in = STAGE_CHANNELS[0]
            for index, (n_blocks, channels, stride) in enumerate(
                    zip(stage_blocks, STAGE_CHANNELS, STAGE_STRIDES)):
                stage = ResidualStage(block, n_blocks, channels_in, channels, stride,
                                      **block_options)
                setattr(self, f"res{index + 2}", stage)
                channels_in = channels * block.expansion
            self.fc = L.Linear(channels_in, n_class)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.max_pooling_2d(h, 3, stride=2, pad=1)
        h = self.res5(self.res4(self.res3(self.res2(h))))
        return self.fc(F.global_average_pooling_2d(h))


def resnet50(n_class=1000, in_channels=3, stride_in_1x1=True):
    """ResNet-50: bottleneck blocks [3, 4, 6, 3]; 25,557,032 parameters for 1000 classes.

    ``stride_in_1x1=True`` (default) is ResNet v1 as in the paper's code
    (stride in each stage's first 1x1 conv); ``False`` is torchvision's v1.5.
    """
    return ResNetImageNet(BottleneckBlock, (3, 4, 6, 3), n_class, in_channels,
                          stride_in_1x1=stride_in_1x1)


def resnet18(n_class=1000, in_channels=3):
    """ResNet-18: basic blocks [2, 2, 2, 2]; 11,689,512 parameters for 1000 classes."""
    return ResNetImageNet(BasicBlock, (2, 2, 2, 2), n_class, in_channels)
