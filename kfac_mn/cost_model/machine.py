"""The machine of the cost model: the rates of one worker and of the links between workers.

:data:`V100_EDR` holds our assumptions for the paper's cluster (see :mod:`kfac_mn.cost_model`);
:func:`load_machine` reads another machine's parameters, e.g. those that
:mod:`kfac_mn.cost_model.calibration` measured on this one.
"""
import dataclasses
import json


@dataclasses.dataclass
class Machine:
    """Rates of one worker and of the links between workers (see the module docstring)."""

    flops: float           # effective GEMM flop/s of forward, backward and factor products
    fp32_flops: float      # effective float32 GEMM flop/s of the preconditioning
    inv_flops: float       # effective flop/s of a Cholesky-based inversion (d^3 flops)
    mem_bandwidth: float   # bytes/s of elementwise work
    latency: float         # seconds per kernel launch (GPU) or function call (CPU)
    alpha: float           # seconds per message
    call_overhead: float   # seconds of software per collective call (our communicator)
    bandwidth: float       # bytes/s per link
    act_bytes: int         # bytes per activation value
    comm_bytes: int        # bytes per communicated value
    im2col: bool           # does a convolution materialise its patches
    # Stages 2 and 4 outside their collectives (pack, unpack and, for float16, the scaling
    # and casts): seconds per gradient tensor, per gradient value, per statistic tensor and
    # per statistic value (upper triangles); float32 and, ``half_``, float16 communication.
    pack_grad: float
    pack_grad_value: float
    pack_stat: float
    pack_stat_value: float
    half_pack_grad: float
    half_pack_grad_value: float
    half_pack_stat: float
    half_pack_stat_value: float


V100_EDR = Machine(flops=50e12, fp32_flops=12e12, inv_flops=5e12, mem_bandwidth=750e9,
                   latency=10e-6, alpha=2e-6, call_overhead=5e-6, bandwidth=12.5e9,
                   act_bytes=2, comm_bytes=2, im2col=False, pack_grad=30e-6,
                   pack_grad_value=1.6e-11, pack_stat=30e-6, pack_stat_value=3.2e-11,
                   half_pack_grad=60e-6, half_pack_grad_value=1.6e-11, half_pack_stat=60e-6,
                   half_pack_stat_value=3.2e-11)
MACHINE_FIELDS = tuple(field.name for field in dataclasses.fields(Machine))


def load_machine(path):
    """A Machine from a JSON object with every field of :class:`Machine` (and 'note')."""
    try:
        with open(path) as f:
            values = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read a JSON object ({error})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a JSON object")
    unknown = sorted(set(values) - set(MACHINE_FIELDS) - {"note"})
    missing = [name for name in MACHINE_FIELDS if name not in values]
    if unknown or missing:
        raise ValueError(f"{path}: unknown keys {unknown}, missing keys {missing}"
                         f" (valid: {', '.join(MACHINE_FIELDS)}, note)")
    for name in MACHINE_FIELDS:
        value = values[name]
        expected = bool if name == "im2col" else (int, float)
        if isinstance(value, bool) != (name == "im2col") or not isinstance(value, expected) \
                or (name != "im2col" and not value > 0):
            raise ValueError(f"{path}: key {name!r} must be "
                             f"{'true or false' if name == 'im2col' else 'a positive number'}, "
                             f"got {value!r}")
    return Machine(**{name: values[name] for name in MACHINE_FIELDS})
