"""save_npz / load_npz for links and optimizers, and every error they report."""
import os

import numpy
import pytest

from kfac_mn import initializers, optimizers, serializers
from kfac_mn.link import Chain, ChainList, Link


class Layer(Link):
    def __init__(self, in_size=None, out_size=3):
        super().__init__()
        self.out_size = out_size
        self.add_param("W", None if in_size is None else (out_size, in_size),
                       initializer=initializers.Normal())
        self.add_param("b", (out_size,))
        self.add_persistent("avg", numpy.zeros(out_size, dtype=numpy.float32))
        self.add_persistent("calls", 0)


class Model(Chain):
    def __init__(self, in_size=4):
        super().__init__()
        with self.init_scope():
            self.first = Layer(in_size)
            self.stack = ChainList(Layer(3), Layer(3))


def layers(model):
    return [link for link in model.links() if isinstance(link, Layer)]


def randomize(model, seed):
    rng = numpy.random.RandomState(seed)
    for param in model.params(include_uninit=False):
        param.data[...] = rng.normal(size=param.data.shape)
    for link in layers(model):
        link.avg[...] = rng.normal(size=link.avg.shape)
        link.calls = int(rng.randint(100))


def assert_same_model(a, b):
    pa, pb = a.namedparams(), b.namedparams()
    assert [p for p, _ in pa] == [p for p, _ in pb]
    for (_, x), (_, y) in zip(pa, pb):
        numpy.testing.assert_array_equal(x.data, y.data)
    for la, lb in zip(layers(a), layers(b)):
        numpy.testing.assert_array_equal(la.avg, lb.avg)
        assert la.calls == lb.calls


def test_link_round_trip(tmp_path):
    source, target = Model(), Model()
    randomize(source, 0)
    file = tmp_path / "model.npz"
    serializers.save_npz(file, source)
    with numpy.load(file) as npz:
        assert sorted(npz.files) == sorted(
            f"{prefix}{key}" for prefix in ("first/", "stack/0/", "stack/1/")
            for key in ("W", "b", "avg", "calls"))
    arrays_before = [p.data for p in target.params()]
    serializers.load_npz(file, target)
    assert_same_model(source, target)
    assert all(p.data is a for p, a in zip(target.params(), arrays_before))  # in place
    assert isinstance(target.first.calls, int)


def test_lazy_parameter_is_created_from_the_file_or_skipped(tmp_path):
    source = Model(in_size=None)
    target = Model(in_size=None)
    file = tmp_path / "lazy.npz"
    serializers.save_npz(file, source)  # W of 'first' is not initialised: not saved
    with numpy.load(file) as npz:
        assert "first/W" not in npz.files
    serializers.load_npz(file, target)
    assert target.first.W.data is None

    source.first.initialize_param("W", (3, 5))
    serializers.save_npz(file, source)
    serializers.load_npz(file, target)
    numpy.testing.assert_array_equal(target.first.W.data, source.first.W.data)


def test_save_overwrites_atomically_and_cleans_up_on_failure(tmp_path, monkeypatch):
    model = Model()
    file = tmp_path / "model.npz"
    serializers.save_npz(file, model)
    before = file.read_bytes()

    def crash(f, **arrays):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(numpy, "savez_compressed", crash)
    randomize(model, 1)
    with pytest.raises(OSError, match="disk full"):
        serializers.save_npz(file, model)
    assert file.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.npz"]


def test_missing_key_names_key_and_file(tmp_path):
    file = tmp_path / "small.npz"
    small = Model()
    del small.stack[1].b
    serializers.save_npz(file, small)
    with pytest.raises(KeyError, match=r"small\.npz: key 'stack/1/b' is missing"):
        serializers.load_npz(file, Model())
    serializers.load_npz(file, Model(), strict=False)


def test_extra_key_names_key_and_file(tmp_path):
    file = tmp_path / "big.npz"
    serializers.save_npz(file, Model())
    small = Model()
    del small.stack[1].b
    with pytest.raises(ValueError, match=r"big\.npz: unexpected keys 'stack/1/b'"):
        serializers.load_npz(file, small)
    serializers.load_npz(file, small, strict=False)


def test_shape_mismatch_names_key_shapes_and_file(tmp_path):
    file = tmp_path / "wide.npz"
    serializers.save_npz(file, Model(in_size=6))
    with pytest.raises(ValueError, match=r"wide\.npz: key 'first/W' has shape \(3, 6\), "
                                         r"expected \(3, 4\)"):
        serializers.load_npz(file, Model(in_size=4))


def test_scalar_key_holding_an_array_is_refused(tmp_path):
    file = tmp_path / "odd.npz"
    arrays = serializers.DictionarySerializer()
    Model().serialize(arrays)
    arrays.target["first/calls"] = numpy.zeros(2)
    numpy.savez(file, **arrays.target)
    with pytest.raises(ValueError, match=r"key 'first/calls' has shape \(2,\), expected a "
                                         r"scalar \(int\)"):
        serializers.load_npz(file, Model())


def test_unreadable_files(tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("not an archive")
    with pytest.raises(ValueError, match=r"notes\.npz: not a readable \.npz archive"):
        serializers.load_npz(text, Model())
    single = tmp_path / "single.npy"
    numpy.save(single, numpy.zeros(3))
    with pytest.raises(ValueError, match=r"single\.npy: holds a single array"):
        serializers.load_npz(single, Model())
    with pytest.raises(FileNotFoundError):
        serializers.load_npz(tmp_path / "absent.npz", Model())
    with open(text, "rb") as handle, pytest.raises(TypeError, match="needs a file path"):
        serializers.save_npz(handle, Model())


def test_duplicate_key_is_refused():
    serializer = serializers.DictionarySerializer()
    serializer("a", 1)
    with pytest.raises(ValueError, match="'a' is written twice"):
        serializer("a", 2)


def test_path_selects_a_subtree(tmp_path):
    source = Model()
    randomize(source, 2)
    arrays = serializers.DictionarySerializer()
    source.serialize(arrays["model"])
    arrays("iteration", 5)
    file = tmp_path / "snapshot.npz"
    numpy.savez(file, **arrays.target)
    target = Model()
    serializers.load_npz(file, target, path="model/")
    assert_same_model(source, target)


def _train(model, optimizer, steps, seed):
    rng = numpy.random.RandomState(seed)
    for _ in range(steps):
        for param in model.params():
            param.grad = rng.normal(size=param.data.shape).astype(param.data.dtype)
        optimizer.update()


def test_optimizer_round_trip_resumes_exactly(tmp_path):
    model = Model()
    optimizer = optimizers.MomentumSGD(lr=0.1, momentum=0.9).setup(model)
    _train(model, optimizer, 3, seed=0)
    optimizer.lr = 0.05
    optimizer.new_epoch()
    serializers.save_npz(tmp_path / "model.npz", model)
    serializers.save_npz(tmp_path / "optimizer.npz", optimizer)
    with numpy.load(tmp_path / "optimizer.npz") as npz:
        assert {"t", "epoch", "hyperparam/lr", "hyperparam/momentum", "first/W/t",
                "first/W/v", "stack/1/b/v"} <= set(npz.files)

    resumed_model = Model()
    resumed = optimizers.MomentumSGD(lr=1.0, momentum=0.5).setup(resumed_model)
    serializers.load_npz(tmp_path / "model.npz", resumed_model)
    serializers.load_npz(tmp_path / "optimizer.npz", resumed)
    assert (resumed.t, resumed.epoch, resumed.lr, resumed.momentum) == (3, 1, 0.05, 0.9)
    assert type(resumed.lr) is float and type(resumed.t) is int
    assert resumed_model.first.W.update_rule.t == 3

    _train(model, optimizer, 2, seed=1)
    _train(resumed_model, resumed, 2, seed=1)
    assert_same_model(model, resumed_model)


def test_optimizer_state_needs_initialised_parameters(tmp_path):
    model = Model()
    optimizer = optimizers.MomentumSGD().setup(model)
    serializers.save_npz(tmp_path / "optimizer.npz", optimizer)
    lazy = Model(in_size=None)
    with pytest.raises(ValueError, match="state of /first/W: the parameter is not initialised"):
        serializers.load_npz(tmp_path / "optimizer.npz", optimizers.MomentumSGD().setup(lazy))


def test_optimizer_state_shape_mismatch(tmp_path):
    optimizer = optimizers.MomentumSGD().setup(Model(in_size=6))
    serializers.save_npz(tmp_path / "optimizer.npz", optimizer)
    other = optimizers.MomentumSGD().setup(Model(in_size=4))
    with pytest.raises(ValueError, match=r"key 'first/W/v' has shape \(3, 6\), expected \(3, 4\)"):
        serializers.load_npz(tmp_path / "optimizer.npz", other)


def test_optimizer_without_setup_cannot_be_saved(tmp_path):
    with pytest.raises(RuntimeError, match="call setup"):
        serializers.save_npz(tmp_path / "optimizer.npz", optimizers.MomentumSGD())
    assert os.listdir(tmp_path) == []
