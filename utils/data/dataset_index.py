"""Index checks shared by the data sets: Python sequence rules, errors that name the data set."""
import operator


def checked_index(i, length, what):
    """``i`` as a non-negative index among ``length`` examples (a negative ``i`` counts from
    the end, as for a Python sequence); an ``IndexError`` naming ``what`` when out of range."""
    i = operator.index(i)
    if not -length <= i < length:
        raise IndexError(f"index {i} out of range for {what}")
    return i + length if i < 0 else i
