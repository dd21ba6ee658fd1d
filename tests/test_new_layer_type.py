"""How to add a layer type: one block class and one registration, from outside the library
(tests/new_layer_type.py).  Every consumer of the registry then serves it: KFAC and
DistributedKFAC (factors equal to brute force), work items, the owners' assignment, weight
rescaling and the cost model's trace."""
import numpy as np
import pytest

from kfac_mn import functions as F
from kfac_mn import links as L
from kfac_mn.cost_model.trace import trace_model
from kfac_mn.distributed import assignment
from kfac_mn.distributed.work_items import build_work_items
from kfac_mn.fisher import block_class_for, build_fisher_blocks, register_block
from kfac_mn.fisher.blocks import KroneckerBlock, LinearBlock
from kfac_mn.optimizer_hooks import WeightRescale
from kfac_mn.optimizers import KFAC
from tests.kfac_models import MixNet, mixnet_factors, to_float64
from tests.new_layer_type import ChannelMix, ChannelMixBlock
from tests.test_communicators import assert_job_passed


def make_model():
    np.random.seed(0)
    return to_float64(MixNet())


def batch(size=6, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((size, 3, 5)), rng.integers(0, 3, size).astype(np.int32)


def test_the_registry_serves_the_new_layer_everywhere():
    model = make_model()
    assert block_class_for(model.mix) is ChannelMixBlock
    blocks = build_fisher_blocks(model)
    assert sorted(blocks) == ["/fc", "/mix"] and isinstance(blocks["/mix"], ChannelMixBlock)
    items = {item.name: item for item in build_work_items(model, blocks)}
    assert items["/mix"].statistic_shapes() == {"A": (3, 3), "G": (4, 4)}
    # gradients 12; A 3^3 + 6 packed; G 4^3 + 10 packed
    assert assignment.estimated_cost(items["/mix"]) == 12 + 27 + 6 + 64 + 10
    WeightRescale()(KFAC().setup(model))
    W = model.mix.W.data
    assert np.sqrt((W * W).sum()) == pytest.approx(np.sqrt(2 * W.shape[0]))


def test_the_cost_model_traces_the_new_layer():
    model = make_model()
    profile = trace_model(model, "mixnet", 5, example_shape=(3, 5))
    assert sorted(profile.call_of) == ["/fc", "/mix"]
    assert profile.call_of["/mix"].label == "ChannelMixFunction"
    assert profile.parameters == 4 * 3 + 3 * 20 + 3


def test_one_kfac_step_has_the_brute_force_factors_and_training_converges():
    model = make_model()
    x, t = batch()
    A, G = mixnet_factors(model, x, t)
    optimizer = KFAC(lr=0.05, damping=1e-2).setup(model)

    def lossfun(a, b):
        return F.softmax_cross_entropy(model(a), b)

    first = float(optimizer.update(lossfun, x, t).data)
    block = optimizer.fisher_blocks["/mix"]
    np.testing.assert_allclose(block.factors["A"], A, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(block.factors["G"], G, rtol=1e-12, atol=1e-14)
    assert set(block.inverses) == {"A", "G"}
    for _ in range(30):
        last = float(optimizer.update(lossfun, x, t).data)
    assert last < 0.2 * first


@pytest.mark.mpi
def test_distributed_kfac_on_2_ranks_has_the_brute_force_factors():
    output = assert_job_passed("check_new_layer_type.py", 2)
    assert "owns /mix: A and G equal the brute-force factors of the global batch of 6" in output
    assert "new layer type: 2 ranks match one process after 3 steps" in output


def test_registration_errors_name_the_classes():
    class Other(KroneckerBlock):
        link_type = L.Linear
        function_types = LinearBlock.function_types

    with pytest.raises(ValueError, match="Linear already has the Fisher block LinearBlock"):
        register_block(Other)
    assert register_block(ChannelMixBlock) is ChannelMixBlock  # again: nothing changes

    class NoLink(KroneckerBlock):
        link_type = int
        function_types = LinearBlock.function_types

    with pytest.raises(TypeError, match="NoLink.link_type must be a Link class"):
        register_block(NoLink)

    class NoFunctions(KroneckerBlock):
        link_type = ChannelMix
        function_types = ("LinearFunction",)

    with pytest.raises(TypeError, match="non-empty tuple of FunctionNode classes"):
        register_block(NoFunctions)
