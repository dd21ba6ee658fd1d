"""Differentiable functions, with Chainer's names and argument order."""
from kfac_mn.functions.basic_math import (  # noqa: F401
    add, div, get_item, mean, mul, neg, pow_const, reshape, sub, sum, transpose)
