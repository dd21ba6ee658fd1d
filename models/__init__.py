"""Models of the experiments; ``archs`` maps a name to a factory taking
``(n_class=..., in_channels=...)``.  ``models.torch_resnet50`` (imported on demand, it needs
PyTorch) is the PyTorch twin of ResNet-50 that the speed benchmarks compare with."""
import functools

from models.resnet_imagenet import ResNetImageNet, resnet18, resnet50  # noqa: F401
from models.resnet_small import ResNetSmall, cifar_resnet, resnet_mnist  # noqa: F401

archs = {
    "resnet50": resnet50,
    "resnet18": resnet18,
    "resnet8": functools.partial(cifar_resnet, 8),
    "resnet20": functools.partial(cifar_resnet, 20),
    "resnet32": functools.partial(cifar_resnet, 32),
    "resnet_mnist": resnet_mnist,
}
