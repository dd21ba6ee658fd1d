"""kfac_mn.initializers: values, scales, fans, determinism, errors."""
import numpy
import pytest

from kfac_mn import initializers as I


def test_fans_follow_chainer():
    assert I.get_fans((64, 3, 7, 7)) == (3 * 49, 64 * 49)
    assert I.get_fans((10, 20)) == (20, 10)
    with pytest.raises(ValueError, match=r"at least 2 axes, got shape \(5,\)"):
        I.get_fans((5,))


def test_constants_fill_in_place_and_broadcast():
    array = numpy.empty((2, 3), dtype=numpy.float32)
    I.Constant(numpy.arange(3))(array)
    numpy.testing.assert_array_equal(array, [[0, 1, 2], [0, 1, 2]])
    I.One()(array)
    assert (array == 1).all()
    I.Zero()(array)
    assert (array == 0).all()
    with pytest.raises(ValueError, match=r"shape \(4,\) does not fit an array of shape \(2, 3\)"):
        I.Constant(numpy.zeros(4))(array)


@pytest.mark.parametrize("initializer, expected_std", [
    (I.Normal(0.5), 0.5),
    (I.Uniform(0.5), 0.5 / numpy.sqrt(3)),
    (I.LeCunNormal(), numpy.sqrt(1 / (32 * 9))),
    (I.GlorotUniform(), numpy.sqrt(6 / (32 * 9 + 64 * 9)) / numpy.sqrt(3)),
    (I.HeNormal(), numpy.sqrt(2 / (32 * 9))),
    (I.HeNormal(fan_option="fan_out"), numpy.sqrt(2 / (64 * 9))),
    (I.HeNormal(scale=2.0), 2 * numpy.sqrt(2 / (32 * 9))),
])
def test_random_initializers_have_the_documented_scale(initializer, expected_std):
    numpy.random.seed(0)
    array = I.generate_array(initializer, (64, 32, 3, 3))
    assert array.dtype == numpy.float32
    assert abs(array.mean()) < 0.05 * expected_std
    assert array.std() == pytest.approx(expected_std, rel=0.03)


def test_uniform_bounds():
    array = I.generate_array(I.GlorotUniform(rng=numpy.random.RandomState(0)), (50, 40))
    assert numpy.abs(array).max() <= numpy.sqrt(6 / 90)


def test_same_seed_same_values_global_and_explicit_rng():
    numpy.random.seed(7)
    first = I.generate_array(I.HeNormal(), (8, 4, 3, 3))
    numpy.random.seed(7)
    second = I.generate_array(I.HeNormal(), (8, 4, 3, 3))
    numpy.testing.assert_array_equal(first, second)
    a = I.generate_array(I.Normal(rng=numpy.random.default_rng(3)), (5, 5))
    b = I.generate_array(I.Normal(rng=numpy.random.default_rng(3)), (5, 5))
    numpy.testing.assert_array_equal(a, b)
    assert not numpy.array_equal(first[:5, :4, 0, 0], a[:, :4])


def test_dtype_choice():
    assert I.generate_array(I.Normal(dtype=numpy.float16), (3, 3)).dtype == numpy.float16
    assert I.generate_array(I.Normal(dtype=numpy.float16), (3, 3),
                            numpy.float64).dtype == numpy.float64


def test_get_initializer_and_bad_arguments():
    default = I.Zero()
    assert I.get_initializer(None, default) is default
    assert isinstance(I.get_initializer(0.5, default), I.Constant)
    assert isinstance(I.get_initializer(numpy.ones(3), default), I.Constant)
    with pytest.raises(TypeError, match="got str"):
        I.get_initializer("he", default)
    with pytest.raises(ValueError, match="fan_option"):
        I.HeNormal(fan_option="fan_avg")
    with pytest.raises(ValueError, match="scale must be positive"):
        I.Normal(scale=0.0)
