"""Optimizer framework, MomentumSGD and WeightDecay (hand computations and PyTorch)."""
import numpy
import numpy as np
import pytest

from kfac_mn import functions as F
from kfac_mn import links as L
from kfac_mn import optimizer_hooks, optimizers
from kfac_mn.link import Chain, Link
from kfac_mn.optimizer import GradientMethod, Hyperparameter, MicroBatches, UpdateRule
from kfac_mn.optimizers import KFAC, MomentumSGD
from kfac_mn.variable import Parameter


class Weights(Link):
    def __init__(self, values, dtype=numpy.float32):
        super().__init__()
        with self.init_scope():
            self.W = Parameter(numpy.array(values, dtype=dtype))


class Pair(Chain):
    def __init__(self, dtype=numpy.float32):
        super().__init__()
        with self.init_scope():
            self.a = Weights([1.0, -2.0, 3.0], dtype)
            self.b = Weights([[0.5, 0.25], [-1.0, 2.0]], dtype)


GRADS = [
    {"/a/W": [0.1, 0.2, -0.3], "/b/W": [[1.0, 0.0], [0.5, -0.5]]},
    {"/a/W": [-0.4, 0.0, 0.6], "/b/W": [[0.0, 2.0], [-1.5, 0.25]]},
    {"/a/W": [0.3, -0.1, 0.2], "/b/W": [[-1.0, 1.0], [0.0, 0.75]]},
]


def set_grads(model, grads):
    for path, param in model.namedparams():
        param.grad = numpy.array(grads[path], dtype=param.data.dtype)


def test_momentum_sgd_matches_hand_computation():
    model = Pair()
    optimizer = optimizers.MomentumSGD(lr=0.1, momentum=0.9).setup(model)
    expected = {path: numpy.array(p.data, dtype=numpy.float64)
                for path, p in model.namedparams()}
    velocity = {path: numpy.zeros_like(w) for path, w in expected.items()}
    for grads in GRADS:
        set_grads(model, grads)
        optimizer.update()
        for path in expected:
            velocity[path] = 0.9 * velocity[path] - 0.1 * numpy.array(grads[path])
            expected[path] = expected[path] + velocity[path]
    for path, param in model.namedparams():
        numpy.testing.assert_allclose(param.data, expected[path], rtol=1e-6, atol=1e-7)
        numpy.testing.assert_allclose(param.update_rule.state["v"], velocity[path],
                                      rtol=1e-6, atol=1e-7)
        assert param.update_rule.t == 3
    assert optimizer.t == 3


@pytest.mark.torch
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_momentum_sgd_matches_torch_sgd(weight_decay):
    """torch.optim.SGD keeps b = m b + g and steps W -= lr b; ours keeps v = -lr b."""
    torch = pytest.importorskip("torch")
    model = Pair()
    optimizer = optimizers.MomentumSGD(lr=0.05, momentum=0.9).setup(model)
    if weight_decay:
        optimizer.add_hook(optimizer_hooks.WeightDecay(weight_decay))
    torch_params = {path: torch.tensor(p.data.copy(), requires_grad=True)
                    for path, p in model.namedparams()}
    torch_sgd = torch.optim.SGD(list(torch_params.values()), lr=0.05, momentum=0.9,
                                weight_decay=weight_decay)
    rng = numpy.random.RandomState(0)
    for _ in range(6):
        grads = {path: rng.normal(size=p.data.shape).astype(numpy.float32)
                 for path, p in model.namedparams()}
        set_grads(model, grads)
        optimizer.update()
        for path, tensor in torch_params.items():
            tensor.grad = torch.from_numpy(grads[path])
        torch_sgd.step()
    for path, param in model.namedparams():
        numpy.testing.assert_allclose(param.data, torch_params[path].detach().numpy(),
                                      rtol=1e-5, atol=1e-6)
        buffer = torch_sgd.state[torch_params[path]]["momentum_buffer"].numpy()
        numpy.testing.assert_allclose(param.update_rule.state["v"], -0.05 * buffer,
                                      rtol=1e-5, atol=1e-7)


def test_update_with_lossfun_clears_grads_backprops_and_frees_the_graph():
    model = Weights([1.0, -2.0, 3.0])
    optimizer = optimizers.MomentumSGD(lr=0.1, momentum=0.0).setup(model)
    model.W.grad = numpy.full(3, 100.0, dtype=numpy.float32)  # stale: must be cleared

    def lossfun(scale):
        return F.sum(model.W * model.W) * scale  # gradient = 2 * scale * W

    loss = optimizer.update(lossfun, 0.5)
    assert float(loss.data) == pytest.approx(7.0)
    assert loss.creator is None
    numpy.testing.assert_allclose(model.W.data, [0.9, -1.8, 2.7], rtol=1e-6)
    assert optimizer.update() is None
    assert optimizer.t == 2


def test_update_keeps_the_parameter_dtype():
    for dtype in (numpy.float16, numpy.float32):
        model = Pair(dtype)
        optimizer = optimizers.MomentumSGD(lr=numpy.float64(0.1),
                                           momentum=numpy.float64(0.9)).setup(model)
        optimizer.add_hook(optimizer_hooks.WeightDecay(numpy.float64(1e-4)))
        for grads in GRADS:
            set_grads(model, grads)
            optimizer.update()
        for param in model.params():
            assert param.data.dtype == dtype
            assert param.update_rule.state["v"].dtype == dtype


def test_parameters_without_gradient_get_zero_gradient_chainer_style():
    model = Pair()
    optimizer = optimizers.MomentumSGD(lr=0.1, momentum=0.5).setup(model)
    set_grads(model, GRADS[0])
    optimizer.update()
    v = model.a.W.update_rule.state["v"].copy()
    before = model.a.W.data.copy()
    model.cleargrads()
    optimizer.update()
    numpy.testing.assert_array_equal(model.a.W.grad, numpy.zeros(3, dtype=numpy.float32))
    numpy.testing.assert_allclose(model.a.W.data, before + 0.5 * v, rtol=1e-6)


def test_hyperparameters_inherit_and_can_be_overridden_per_rule():
    model = Pair()
    optimizer = optimizers.MomentumSGD(lr=0.1).setup(model)
    rule_a, rule_b = model.a.W.update_rule, model.b.W.update_rule
    assert rule_a.hyperparam.lr == 0.1
    optimizer.lr = 0.02
    assert optimizer.hyperparam.lr == 0.02 and rule_a.hyperparam.lr == 0.02
    rule_b.hyperparam.lr = 0.0
    assert rule_a.hyperparam.get_dict() == {"lr": 0.02, "momentum": 0.9}
    before = model.b.W.data.copy()
    set_grads(model, GRADS[0])
    optimizer.update()
    numpy.testing.assert_array_equal(model.b.W.data, before)
    with pytest.raises(AttributeError, match="'beta1' is not defined"):
        _ = rule_a.hyperparam.beta1


def test_hyperparameter_chain_lookup():
    root = Hyperparameter()
    root.lr = 1.0
    child = Hyperparameter(root)
    child.momentum = 0.5
    assert (child.lr, child.momentum, child.parent) == (1.0, 0.5, root)
    assert child.get_dict() == {"lr": 1.0, "momentum": 0.5}


def test_disabled_rule_leaves_the_parameter_alone():
    model = Pair()
    optimizer = optimizers.MomentumSGD().setup(model)
    model.a.W.update_rule.enabled = False
    before = model.a.W.data.copy()
    set_grads(model, GRADS[0])
    optimizer.add_hook(optimizer_hooks.WeightDecay(0.1))
    optimizer.update()
    numpy.testing.assert_array_equal(model.a.W.data, before)
    numpy.testing.assert_array_equal(model.a.W.grad,
                                     numpy.float32(GRADS[0]["/a/W"]))  # no decay either


def test_weight_decay_adds_rate_times_weight_to_the_gradient():
    model = Pair()
    optimizer = optimizers.MomentumSGD(lr=0.0).setup(model)
    optimizer.add_hook(optimizer_hooks.WeightDecay(0.01))
    set_grads(model, GRADS[0])
    weights = model.b.W.data.copy()
    optimizer.update()
    numpy.testing.assert_allclose(
        model.b.W.grad, numpy.array(GRADS[0]["/b/W"]) + 0.01 * weights, rtol=1e-6)
    with pytest.raises(ValueError, match="rate must be >= 0"):
        optimizer_hooks.WeightDecay(-1.0)


def test_hooks_run_in_order_at_their_timing():
    model = Pair()
    optimizer = optimizers.MomentumSGD().setup(model)
    calls = []

    def make(label):
        return lambda opt: calls.append((label, opt.t))

    optimizer.add_hook(make("post"), name="post", timing="post")
    optimizer.add_hook(make("pre1"), name="pre1")
    optimizer.add_hook(make("pre2"), name="pre2", timing="pre")
    optimizer.update()
    assert calls == [("pre1", 0), ("pre2", 0), ("post", 1)]
    optimizer.remove_hook("pre1")
    calls.clear()
    optimizer.update()
    assert calls == [("pre2", 1), ("post", 2)]
    with pytest.raises(KeyError, match="'pre2' is already added"):
        optimizer.add_hook(make("again"), name="pre2", timing="post")
    with pytest.raises(ValueError, match="timing must be 'pre' or 'post', got 'auto'"):
        optimizer.add_hook(make("x"), name="x", timing="auto")
    with pytest.raises(KeyError, match="no optimizer hook named 'x'"):
        optimizer.remove_hook("x")
    with pytest.raises(TypeError, match="must be callable"):
        optimizer.add_hook(3)


def test_epoch_and_setup_errors():
    optimizer = optimizers.MomentumSGD()
    with pytest.raises(RuntimeError, match="call setup"):
        optimizer.update()
    with pytest.raises(TypeError, match="needs a Link"):
        optimizer.setup(numpy.zeros(3))
    model = Pair()
    optimizer.setup(model)
    optimizer.new_epoch()
    assert optimizer.epoch == 1
    with model.init_scope():
        model.late = Weights([1.0])
    with pytest.raises(RuntimeError, match="/late/W has no update rule"):
        optimizer.update()


@pytest.mark.parametrize("kwargs, message", [
    ({"lr": -0.1}, "lr must be a number >= 0, got -0.1"),
    ({"lr": None}, "lr must be a number >= 0, got None"),
    ({"momentum": 1.5}, r"momentum must be a number in \[0, 1\], got 1.5"),
])
def test_momentum_sgd_rejects_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        optimizers.MomentumSGD(**kwargs)


def test_gradient_method_subclass_plugs_in_its_rule():
    class SignRule(UpdateRule):
        def update_core(self, param):
            param.data -= self.hyperparam.step * numpy.sign(param.grad).astype(param.dtype)

    class SignSGD(GradientMethod):
        def __init__(self):
            super().__init__()
            self.hyperparam.step = 0.5

        def create_update_rule(self):
            return SignRule(self.hyperparam)

    model = Weights([1.0, 1.0])
    optimizer = SignSGD().setup(model)
    model.W.grad = numpy.array([2.0, -3.0], dtype=numpy.float32)
    optimizer.update()
    numpy.testing.assert_array_equal(model.W.data, [0.5, 1.5])
    assert model.W.update_rule.state == {}


def test_weight_rescale_sets_conv_and_linear_norms_and_leaves_the_rest():
    from kfac_mn import links as L

    class Net(Chain):
        def __init__(self):
            super().__init__()
            with self.init_scope():
                self.conv = L.Convolution2D(2, 5, 3, 1, 1)
                self.bn = L.BatchNormalization(5)
                self.fc = L.Linear(5 * 4 * 4, 3)

        def forward(self, x):
            return self.fc(self.bn(self.conv(x)))

    rng = numpy.random.default_rng(0)
    model = Net()
    opt = optimizers.MomentumSGD(lr=0.5)
    opt.setup(model)
    opt.add_hook(optimizer_hooks.WeightRescale())
    x = rng.standard_normal((4, 2, 4, 4)).astype(numpy.float32)
    t = numpy.array([0, 1, 2, 0], dtype=numpy.int32)
    opt.update(lambda: F.softmax_cross_entropy(model(x), t))
    assert numpy.linalg.norm(model.conv.W.data) == pytest.approx(numpy.sqrt(10.0), rel=1e-5)
    assert numpy.linalg.norm(model.fc.W.data) == pytest.approx(numpy.sqrt(6.0), rel=1e-5)
    assert model.conv.W.data.dtype == numpy.float32
    assert not numpy.allclose(model.bn.gamma.data, 1.0)  # trained, not rescaled


class NoBatchNorm(Chain):
    """A convolution and a linear layer: no layer mixes the examples of a batch, so an update
    accumulated over micro-batches equals the whole-batch one."""

    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.conv = L.Convolution2D(1, 3, 3, pad=1)
            self.fc = L.Linear(3 * 6 * 6, 4)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)))


@pytest.mark.parametrize("optimizer_class", [MomentumSGD, KFAC])
def test_micro_batched_update_equals_the_whole_batch(optimizer_class):
    """Every optimizer takes MicroBatches the same way (Optimizer.compute_gradients); fails
    without the division by the number of parts."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 1, 6, 6))
    t = rng.integers(0, 4, 12).astype(np.int32)
    weights = []
    for parts in (1, 3, 2):  # the whole batch; three parts of 4; two parts of 6
        np.random.seed(0)
        model = NoBatchNorm()
        for param in model.params():
            param.data = param.data.astype(np.float64)
        optimizer = optimizer_class(lr=0.1)
        optimizer.setup(model)

        def lossfun(a, b, model=model):
            return F.softmax_cross_entropy(model(a), b)

        bounds = np.linspace(0, 12, parts + 1).astype(int)
        args = (x, t) if parts == 1 else (MicroBatches(
            [(x[i:j], t[i:j]) for i, j in zip(bounds[:-1], bounds[1:])]),)
        losses = [float(optimizer.update(lossfun, *args).data) for _ in range(3)]
        weights.append(([p.data.copy() for _, p in sorted(model.namedparams())], losses))
    for other, losses in weights[1:]:
        for expected, found in zip(weights[0][0], other):
            np.testing.assert_allclose(found, expected, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(losses, weights[0][1], rtol=1e-10)


class HalvingCommunicator:
    """Stands in for two ranks whose other rank has zero gradients: the mean halves them."""

    stats = {}

    def __init__(self):
        self.calls = []

    def bcast_data(self, link):
        self.calls.append("bcast_data")

    def multi_node_mean_grad(self, link):
        self.calls.append("multi_node_mean_grad")
        for param in link.params(include_uninit=False):
            param.grad = param.grad / 2


def test_multi_node_optimizer_wraps_any_optimizer():
    x = np.random.default_rng(0).standard_normal((6, 1, 6, 6)).astype(np.float32)
    t = np.arange(6, dtype=np.int32) % 4
    models = []
    for wrapped in (False, True):
        np.random.seed(0)
        model = NoBatchNorm()
        comm = HalvingCommunicator()
        sgd = MomentumSGD(lr=0.1)
        optimizer = optimizers.create_multi_node_optimizer(sgd, comm) if wrapped else sgd
        optimizer.setup(model)

        def lossfun(a, b, model=model):
            return F.softmax_cross_entropy(model(a), b)

        if wrapped:
            optimizer.lr = 0.2  # reaches the wrapped optimizer: twice the lr, half the grad
            assert sgd.lr == 0.2 and optimizer.t == 0
            optimizer.update(lossfun, MicroBatches([(x[:3], t[:3]), (x[3:], t[3:])]))
            report = optimizer.last_step_report
            assert list(report["stages"]) == ["1_forward_backward", "2_allreduce_gradients",
                                              "3_update"]
            assert report["step"] == 1 and comm.calls == ["bcast_data",
                                                           "multi_node_mean_grad"]
        else:
            optimizer.update(lossfun, MicroBatches([(x[:3], t[:3]), (x[3:], t[3:])]))
        models.append([p.data.copy() for _, p in model.namedparams()])
    for alone, wrapped in zip(*models):
        np.testing.assert_allclose(wrapped, alone, rtol=1e-6, atol=1e-7)
