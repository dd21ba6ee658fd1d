"""The cost model next to measured runs: bench_kfac.py (one process) and bench_comm.py (its
measured part: ``models.resnet_mnist`` at 28x28 on its ranks, each variable-count algorithm
with float32 and float16 communication).  Stages 2 and 4 absorb the wait for a slower rank in
their first collective, so their measured value is the minimum over ranks (the rank that
arrived last waited least); the others take the maximum."""
import dataclasses
import json

import numpy

from kfac_mn.cost_model.stage_costs import iteration, measured_compute, modelled_compute


def make_compute(profile, machine, batch, measured_compute_json):
    """The modelled compute, or with a bench_kfac.py JSON object the measured one."""
    if measured_compute_json is None:
        return modelled_compute(profile, machine, batch)
    if measured_compute_json["arch"] != profile.arch:
        raise ValueError(f"the measured compute is a run of {measured_compute_json['arch']}, "
                         f"the model is {profile.arch}")
    return measured_compute(profile, machine, batch, measured_compute_json)


def last_json_line(path):
    """The JSON object on the last line of a benchmark's output file."""
    try:
        with open(path) as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
        return json.loads(lines[-1])
    except (OSError, IndexError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: expected a file whose last line is a JSON object from "
                         f"scripts/bench_kfac.py or scripts/bench_comm.py ({error})") from None


#: DistributedKFAC's five stages as sums of the model's stages
KFAC_STAGE_MAP = {"1_compute_local_statistics": ("forward_backward", "factors"),
                  "2_reduce_scatter_statistics": ("reduce_scatter",),
                  "3_precondition_owned_layers": ("owner_work",),
                  "4_allgather_preconditioned_gradients": ("allgather",),
                  "5_apply_update": ("update",)}
#: stages that absorb the wait for a slower rank in their first collective: the rank that
#: arrived last (the smallest time over ranks) waited least, and the model has no waiting
WAITING_STAGES = ("2_reduce_scatter_statistics", "4_allgather_preconditioned_gradients")
#: bench_kfac.py's stages (one process) as sums of the model's stages
BENCH_KFAC_MAP = {"forward+backward": ("forward_backward",), "factors": ("factors",),
                  "running+inversion+precondition": ("owner_work",), "update": ("update",)}


def comparison_rows(measured, machine, trace, in_channels=3, n_class=1000,
                    measured_compute_json=None):
    """[(run, stage, modelled seconds, measured seconds)] for one bench JSON object.

    ``trace(arch, size, in_channels, n_class)`` gives the :class:`~kfac_mn.cost_model.trace.
    Profile` of a model by name (the library knows no models); ``measured_compute_json``: a
    bench_kfac.py run whose compute replaces the modelled one.
    """
    if "kfac_every_step_s" in measured:
        profile = trace(measured["arch"], measured["size"], in_channels, n_class)
        compute = make_compute(profile, machine, measured["batchsize"], measured_compute_json)
        rows = []
        for mode, key in (("sgd", "sgd"), ("kfac_every_step", "kfac_every_step")):
            model = iteration(profile, compute, machine, 1, mode)
            stages = measured["stages"][key]
            found = {"forward+backward": stages["forward"] + stages["backward"],
                     "factors": stages["factors"],
                     "running+inversion+precondition": stages.get("running_factors", 0.0)
                     + stages["inversion"] + stages["precondition"],
                     "update": stages["update"]}
            for name, parts in BENCH_KFAC_MAP.items():
                if mode == "sgd" and name != "forward+backward" and name != "update":
                    continue
                rows.append((f"{measured['arch']} P=1 {mode} b={measured['batchsize']}", name,
                             sum(model[p] for p in parts), found[name]))
        return rows
    if "measured" in measured:
        run = measured["measured"]
        profile = trace("resnet_mnist", 28, 1, 10)
        rows = []
        for measured_run in run["runs"]:
            dtype, per_rank = measured_run["comm_dtype"], measured_run["per_rank"]
            bytes_value = numpy.dtype(dtype).itemsize
            at = dataclasses.replace(machine, comm_bytes=bytes_value)
            compute = make_compute(profile, at, run["batch"], measured_compute_json)
            model = iteration(profile, compute, at, run["ranks"], "kfac_every_step",
                              kfac_collectives=measured_run["collectives"])
            label = (f"resnet_mnist P={run['ranks']} {measured_run['collectives']} {dtype} "
                     f"b={run['batch']}")
            for name, parts in KFAC_STAGE_MAP.items():
                values = [rank["stages"][name]["seconds"] for rank in per_rank]
                found = min(values) if name in WAITING_STAGES else max(values)
                rows.append((label, name, sum(model[p] for p in parts), found))
            rows.append((label, "step", sum(model.values()),
                         max(rank["seconds_per_step"] for rank in per_rank)))
        return rows
    raise ValueError("the JSON object is neither bench_kfac.py's (no "
                     "'kfac_every_step_s') nor bench_comm.py's (no 'measured')")
