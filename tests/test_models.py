"""The ResNets in ``models``: sizes, layer names, forward and backward."""
import numpy
import pytest

import models
from kfac_mn import functions as F
from kfac_mn import links
from kfac_mn.configuration import using_config


def kfac_layers(model):
    kinds = (links.Convolution2D, links.Linear, links.BatchNormalization)
    return [(path, link) for path, link in model.namedlinks() if isinstance(link, kinds)]


def finite_grads_everywhere(model, x, n_class):
    t = numpy.arange(len(x), dtype=numpy.int32) % n_class
    y = model(x)
    assert y.shape == (len(x), n_class)
    F.softmax_cross_entropy(y, t).backward()
    missing = [path for path, p in model.namedparams()
               if p.grad is None or not numpy.isfinite(p.grad).all()]
    assert missing == []


def test_resnet50_has_the_standard_size_and_layout():
    model = models.archs["resnet50"]()
    assert model.count_params() == 25_557_032
    layers = dict(kfac_layers(model))
    assert len(layers) == 107  # 53 conv, 53 BN, 1 FC (docs/SPEC.md, section 4)
    assert sum(isinstance(link, links.Convolution2D) for link in layers.values()) == 53
    assert {"/conv1", "/bn1", "/res2/0/conv1", "/res2/0/conv4", "/res2/0/bn4",
            "/res4/5/conv3", "/res5/2/bn3", "/fc"} <= set(layers)
    assert "/res2/1/conv4" not in layers and "/res5/3" not in layers
    assert [len(model[f"res{i}"]) for i in range(2, 6)] == [3, 4, 6, 3]
    assert all(link.b is None for link in layers.values()
               if isinstance(link, links.Convolution2D))
    assert model.fc.W.shape == (1000, 2048) and model.fc.b.shape == (1000,)
    assert model.conv1.ksize == (7, 7) and model.conv1.stride == (2, 2)
    assert model.res5[0].conv4.W.shape == (2048, 1024, 1, 1)


@pytest.mark.parametrize("stride_in_1x1, conv1_stride, conv2_stride", [
    (True, (2, 2), (1, 1)), (False, (1, 1), (2, 2))])
def test_resnet50_stride_placement(stride_in_1x1, conv1_stride, conv2_stride):
    model = models.resnet50(stride_in_1x1=stride_in_1x1)
    for stage in ("res3", "res4", "res5"):
        block = model[stage][0]
        assert (block.conv1.stride, block.conv2.stride, block.conv4.stride) == (
            conv1_stride, conv2_stride, (2, 2))
        assert model[stage][1].conv1.stride == (1, 1)
    assert model.res2[0].conv1.stride == (1, 1)
    assert model.count_params() == 25_557_032


def test_resnet50_forward_backward_at_224():
    numpy.random.seed(0)
    model = models.archs["resnet50"]()
    x = numpy.random.RandomState(1).normal(size=(2, 3, 224, 224)).astype(numpy.float32)
    finite_grads_everywhere(model, x, 1000)


def test_resnet18_size_and_forward_backward():
    model = models.archs["resnet18"](n_class=7, in_channels=1)
    assert models.archs["resnet18"]().count_params() == 11_689_512
    assert {"/res2/0/conv2", "/res3/0/conv3", "/res3/0/bn3"} <= dict(kfac_layers(model)).keys()
    assert "/res2/0/conv3" not in dict(kfac_layers(model))
    x = numpy.random.RandomState(0).normal(size=(2, 1, 64, 64)).astype(numpy.float32)
    finite_grads_everywhere(model, x, 7)


@pytest.mark.parametrize("arch, depth", [("resnet8", 8), ("resnet20", 20), ("resnet32", 32)])
def test_cifar_resnets_have_6n_plus_2_layers(arch, depth):
    model = models.archs[arch]()
    weighted = [path for path, link in kfac_layers(model)
                if not isinstance(link, links.BatchNormalization)]
    projections = [path for path in weighted if path.endswith("/conv3")]
    assert len(weighted) - len(projections) == depth
    assert projections == ["/res3/0/conv3", "/res4/0/conv3"]
    assert model.insize == 32
    assert [model[f"res{i}"][0].conv1.out_channels for i in (2, 3, 4)] == [16, 32, 64]


@pytest.mark.parametrize("arch, n_class, in_channels, size", [
    ("resnet8", 10, 3, 32), ("resnet20", 100, 3, 32), ("resnet8", 10, 1, 28),
    ("resnet_mnist", 10, 1, 28)])
def test_small_resnets_train_step_shapes(arch, n_class, in_channels, size):
    model = models.archs[arch](n_class=n_class, in_channels=in_channels)
    x = numpy.random.RandomState(0).normal(size=(4, in_channels, size, size))
    finite_grads_everywhere(model, x.astype(numpy.float32), n_class)


def test_resnet_mnist_is_tiny():
    model = models.archs["resnet_mnist"]()
    assert model.count_params() < 25_000
    assert model.insize == 28 and model.conv1.W.shape == (16, 1, 3, 3)


def test_eval_mode_is_deterministic_and_keeps_running_stats():
    model = models.archs["resnet_mnist"]()
    x = numpy.random.RandomState(0).normal(size=(3, 1, 28, 28)).astype(numpy.float32)
    with using_config("train", False):
        first = model(x).data
        second = model(x[:1]).data
    numpy.testing.assert_allclose(first[:1], second, rtol=1e-5, atol=1e-6)
    assert (model.bn1.avg_mean == 0).all()
    model(x)
    assert not (model.bn1.avg_mean == 0).all()


def test_same_seed_same_weights():
    numpy.random.seed(3)
    a = models.archs["resnet8"]()
    numpy.random.seed(3)
    b = models.archs["resnet8"]()
    for (path, p), (_, q) in zip(a.namedparams(), b.namedparams()):
        numpy.testing.assert_array_equal(p.data, q.data, err_msg=path)


def test_bad_architecture_arguments():
    with pytest.raises(ValueError, match="6n\\+2 with n >= 1 .*got 21"):
        models.cifar_resnet(21)
    with pytest.raises(ValueError, match="stage_blocks needs 4 entries"):
        models.ResNetImageNet(models.resnet_blocks.BasicBlock, (2, 2, 2))
    with pytest.raises(ValueError, match="at least one block, got 0"):
        models.ResNetSmall((16,), (0,), (1,), 10, 3, 32)
