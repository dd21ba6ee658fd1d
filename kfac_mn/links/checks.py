"""Argument checks shared by the links, with messages that name the argument."""
import numbers


def check_positive_int(value, what):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def check_pair(value, what, minimum):
    """Return ``(a, b)`` from an int or a pair of ints, each at least ``minimum``."""
    pair = (value, value) if isinstance(value, numbers.Integral) else tuple(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral)
                             or v < minimum for v in pair):
        raise ValueError(f"{what} must be an int or a pair of ints >= {minimum}, got {value!r}")
    return tuple(int(v) for v in pair)
