"""Link, Chain and ChainList: registration, paths, traversal order, devices."""
import numpy
import pytest

from kfac_mn import backend, initializers
from kfac_mn.link import Chain, ChainList, Link, path_key
from kfac_mn.variable import Parameter


class Affine(Link):
    """y = x * W + b with a lazily shaped W (tests only use the parameters)."""

    def __init__(self, size=None):
        super().__init__()
        self.add_param("W", None if size is None else (size,),
                       initializer=initializers.Constant(2.0))
        with self.init_scope():
            self.b = Parameter(numpy.zeros(3, dtype=numpy.float32))
        self.add_persistent("count", 0)


class Net(Chain):
    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.zeta = Affine(3)
            self.alpha = Affine(3)
            self.blocks = ChainList(*[Affine(3) for _ in range(11)])


def test_path_key_sorts_numbers_numerically_and_parents_first():
    paths = ["/b/10/W", "/b/9/W", "/b", "/", "/a/W", "/b/2", "/B"]
    assert sorted(paths, key=path_key) == ["/", "/B", "/a/W", "/b", "/b/2", "/b/9/W",
                                           "/b/10/W"]


def test_init_scope_registers_parameters_and_links_only_inside():
    link = Affine(3)
    link.not_a_param = Parameter(numpy.zeros(1, dtype=numpy.float32))
    assert [p for p, _ in link.namedparams()] == ["/W", "/b"]
    assert link.b.name == "b"

    chain = Chain()
    chain.outside = Affine(3)
    assert chain.namedlinks() == [("/", chain)]
    with chain.init_scope():
        chain.inside = Affine(3)
    assert [p for p, _ in chain.namedlinks()] == ["/", "/inside"]
    assert chain["inside"].name == "inside"
    assert not chain.within_init_scope


def test_namedparams_sorted_by_path_with_numeric_chainlist_children():
    net = Net()
    paths = [p for p, _ in net.namedparams()]
    expected = ["/alpha/W", "/alpha/b"]
    expected += [f"/blocks/{i}/{n}" for i in range(11) for n in ("W", "b")]
    expected += ["/zeta/W", "/zeta/b"]
    assert paths == expected
    assert [p for p, _ in net.namedlinks(skipself=True)][:4] == [
        "/alpha", "/blocks", "/blocks/0", "/blocks/1"]
    assert [p for p, _ in net.namedlinks()][-2:] == ["/blocks/10", "/zeta"]
    assert net.params() == [p for _, p in net.namedparams()]
    assert list(net.children()) == [net.alpha, net.blocks, net.zeta]


def test_param_owners_maps_each_parameter_to_its_link():
    net = Net()
    owners = net.param_owners()
    assert owners[net.blocks[10].W] == ("/blocks/10", net.blocks[10])
    assert owners[net.zeta.b] == ("/zeta", net.zeta)
    assert len(owners) == len(net.params())


def test_lazy_parameter_is_initialised_on_demand():
    link = Affine()
    assert link.W.data is None
    assert [p for p, _ in link.namedparams(include_uninit=False)] == ["/b"]
    with pytest.warns(UserWarning, match="/W is not initialised"):
        assert link.count_params() == 3
    link.initialize_param("W", (4,))
    numpy.testing.assert_array_equal(link.W.data, numpy.full(4, 2.0, numpy.float32))
    assert link.W.data.dtype == numpy.float32
    assert link.count_params() == 7


def test_cleargrads_clears_every_gradient():
    net = Net()
    for param in net.params(include_uninit=False):
        param.grad = numpy.ones_like(param.data)
    net.cleargrads()
    assert all(param.grad is None for param in net.params())


def test_names_already_taken_are_refused():
    link = Affine(3)
    with pytest.raises(AttributeError, match="'b'"):
        link.add_param("b", (3,))
    with pytest.raises(AttributeError, match="'count'"):
        link.add_persistent("count", 1)
    with pytest.raises(TypeError, match="only a Chain"):
        with link.init_scope():
            link.child = Affine(3)
    with pytest.raises(KeyError, match="'missing'"):
        Net()["missing"]
    with pytest.raises(TypeError, match="must be Links"):
        ChainList().add_link(3)


def test_deleting_an_attribute_unregisters_it():
    net = Net()
    del net.zeta
    del net.alpha.b
    assert [p for p, _ in net.namedparams()][:2] == ["/alpha/W", "/blocks/0/W"]
    assert "/zeta" not in [p for p, _ in net.namedlinks()]


def test_to_gpu_without_cupy_fails_clearly():
    if backend.gpu_available():
        pytest.skip("CuPy and a GPU are present")
    with pytest.raises(RuntimeError, match="needs CuPy"):
        Affine(3).to_gpu()


@pytest.mark.gpu
def test_to_gpu_and_back_moves_params_persistents_and_lazy_params():
    if not backend.gpu_available():
        pytest.skip("needs CuPy and a GPU")
    link = Affine()
    link.add_persistent("stat", numpy.arange(3, dtype=numpy.float32))
    link.to_gpu()
    assert link.xp is backend.cupy
    assert backend.is_gpu_array(link.b.data) and backend.is_gpu_array(link.stat)
    link.initialize_param("W", (2,))
    assert backend.is_gpu_array(link.W.data)
    link.to_cpu()
    assert isinstance(link.W.data, numpy.ndarray) and isinstance(link.stat, numpy.ndarray)
    numpy.testing.assert_array_equal(link.stat, numpy.arange(3))
