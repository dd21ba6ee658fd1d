"""Input validation shared by the functions: clear errors instead of silent broadcasting."""


def check_ndim(name, array, ndims, function):
    if array.ndim not in ndims:
        want = " or ".join(str(d) for d in ndims)
        raise ValueError(f"{function}: {name} must have {want} dims, got shape {array.shape}")


def check_same_dtype(function, **arrays):
    """Refuse mixed float dtypes: mixing would silently upcast (e.g. float32 to float64)."""
    items = [(name, a) for name, a in arrays.items() if a is not None]
    first_name, first = items[0]
    for name, a in items[1:]:
        if a.dtype != first.dtype:
            raise TypeError(f"{function}: {name} has dtype {a.dtype} but {first_name} has "
                            f"{first.dtype}; cast them to one dtype first")
    if first.dtype.kind != "f":
        raise TypeError(f"{function}: expected floating-point arrays, got {first.dtype}")


def check_vector(function, name, array, size):
    if array is not None and array.shape != (size,):
        raise ValueError(f"{function}: {name} must have shape ({size},), got {array.shape}")
