"""A real MPI sum for float16 buffers.

The MPI standard has no half-precision datatype and no predefined reduction for one, so the
reduction is a user-defined commutative operation (``MPI.Op.Create``) on a 2-byte contiguous
datatype.  MPI moves the raw 2-byte elements; wherever the algorithm combines two partial
buffers it calls :func:`_sum_float16`, which reads both as float16, adds them in float32 and
rounds the result back to float16.  Each partial sum is therefore rounded to float16 once, as
a native half-precision reduction would do.
"""
import functools

import numpy
from mpi4py import MPI


def _sum_float16(inbuf, inoutbuf, datatype):
    incoming = numpy.frombuffer(inbuf, dtype=numpy.float16)
    accumulator = numpy.frombuffer(inoutbuf, dtype=numpy.float16)
    accumulator[...] = incoming.astype(numpy.float32) + accumulator.astype(numpy.float32)


@functools.lru_cache(maxsize=None)
def float16_type_and_sum():
    """(MPI datatype of one float16 element, MPI sum op on it), created once per process."""
    datatype = MPI.BYTE.Create_contiguous(2)
    datatype.Commit()
    return datatype, MPI.Op.Create(_sum_float16, commute=True)
