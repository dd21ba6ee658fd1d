"""PyTorch twin of models' ResNet-50, for speed comparisons only (no torchvision needed).

Same layers, same shapes and the same stride placement as our ResNet-50
(``stride_in_1x1=True``: the stride sits in the first 1x1 conv of a block, as in
Chainer's ImageNet example that the paper's authors used).
"""
import torch
from torch import nn


class Bottleneck(nn.Module):
    def __init__(self, in_ch, mid_ch, out_ch, stride, stride_in_1x1, projection):
        super().__init__()
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(in_ch, mid_ch, 1, s1, 0, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_ch, eps=2e-5)
        self.conv2 = nn.Conv2d(mid_ch, mid_ch, 3, s3, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_ch, eps=2e-5)
        self.conv3 = nn.Conv2d(mid_ch, out_ch, 1, 1, 0, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch, eps=2e-5)
        self.shortcut = None
        if projection:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, 0, bias=False),
                                          nn.BatchNorm2d(out_ch, eps=2e-5))

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return torch.relu(h + (x if self.shortcut is None else self.shortcut(x)))


class TorchResNet50(nn.Module):
    def __init__(self, n_class=1000, stride_in_1x1=True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=2e-5)
        blocks = []
        in_ch = 64
        for n, mid, stride in ((3, 64, 1), (4, 128, 2), (6, 256, 2), (3, 512, 2)):
            for i in range(n):
                blocks.append(Bottleneck(in_ch, mid, mid * 4, stride if i == 0 else 1,
                                         stride_in_1x1, projection=(i == 0)))
                in_ch = mid * 4
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(2048, n_class)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.max_pool2d(h, 3, 2, 1)
        h = self.blocks(h)
        return self.fc(h.mean(dim=(2, 3)))
