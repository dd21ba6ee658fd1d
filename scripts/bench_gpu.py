"""GPU figures: ResNet-50 forward+backward (ours vs PyTorch), K-FAC steps vs an SGD step.

    python scripts/bench_gpu.py [--batchsize 32] [--size 224] [--iters 10] [--json PATH]

On the current CUDA device, random data, 1000 classes.  Each part runs in its own subprocess
(its own GPU memory pool, its own failure):

* ``ours``, ``ours_cudnn``, ``ours_float16``, ``ours_cudnn_float16``: our ResNet-50
  (``models.resnet50``, the paper's v1 with the stride in the 1x1 convolution) forward +
  backward with the im2col path or cuDNN Frontend graphs (``--conv-backend cudnn``), in
  float32 or with float16 weights and data (the paper's half-precision compute); median
  seconds over ``--iters`` after ``--warmup``, and a per-function profile of one step
  (TimerHook, synchronised).
* ``torch``: the PyTorch twin of the same network (``models/torch_resnet50.py``), strict
  float32 (TF32 off for cuDNN and cuBLAS, cuDNN autotuning off: PyTorch's defaults except
  TF32); mixed precision (``torch.autocast`` float16, AMP), the reference of our float16
  rows; beside them, as information, cuDNN autotuning on, TF32 on (PyTorch's cuDNN default),
  and torchvision's ResNet-50 (v1.5) when torchvision is installed.  Without torch, or
  without CUDA in torch, the row says why and the ratio is null.
* ``kfac``: one step of MomentumSGD, of K-FAC refreshing and inverting every layer every step
  (float32 and ``factor_dtype='float16'`` factors), and of K-FAC on a stale step (factors and
  inverses of the last refresh reused; the refresh interval is ``--stale-interval``), with
  the per-stage seconds of the optimizer's timer; ``kfac_cudnn`` the same with cuDNN graphs
  and batched inversion (``--batched-inversion``).
* ``dkfac``: DistributedKFAC over NcclCommunicator at world size 1 (float16 communication),
  every-step refresh: the packing, scaling and NCCL calls of a real step.

Prints a table, then, as its last line, one JSON object (also written to ``--json``).
``--describe-device`` and ``--summarize DIR`` are the helpers of scripts/gpu_check.sh.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: part name -> (worker, its options)
PARTS = {"ours": ("ours", []), "ours_cudnn": ("ours", ["--conv-backend", "cudnn"]),
         "ours_float16": ("ours", ["--dtype", "float16"]),
         "ours_cudnn_float16": ("ours", ["--conv-backend", "cudnn", "--dtype", "float16"]),
         "torch": ("torch", []), "kfac": ("kfac", []),
         "kfac_cudnn": ("kfac", ["--conv-backend", "cudnn", "--batched-inversion"]),
         "dkfac": ("dkfac", [])}
WORKERS = ("ours", "torch", "kfac", "dkfac")
#: the refresh step's inversion time of issue 18's report (seconds, H200, one at a time)
REPORTED_INVERSION_S = 0.41


def median_seconds(step, synchronize, warmup, iters):
    for _ in range(warmup):
        step()
    synchronize()
    seconds = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        synchronize()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def our_setup(args):
    sys.path.insert(0, ROOT)
    import numpy as np

    from kfac_mn import backend
    from models import resnet50

    if not backend.gpu_available():
        raise RuntimeError("CuPy with a visible CUDA device is needed")
    cupy = backend.cupy
    backend.set_conv_backend(args.conv_backend)
    np.random.seed(0)
    model = resnet50(n_class=1000).to_gpu()
    if args.dtype != "float32":
        for _, param in model.namedparams():
            param.data = param.data.astype(args.dtype)
        for link in model.links():
            for name in ("avg_mean", "avg_var"):
                if getattr(link, name, None) is not None:
                    setattr(link, name, getattr(link, name).astype(args.dtype))
    rng = np.random.default_rng(0)
    x = cupy.asarray(rng.standard_normal((args.batchsize, 3, args.size, args.size),
                                         dtype=np.float32).astype(args.dtype))
    t = cupy.asarray(rng.integers(0, 1000, args.batchsize).astype(np.int32))
    return cupy, model, x, t


def run_ours(args):
    from kfac_mn import functions as F
    from kfac_mn.function_hooks import TimerHook

    cupy, model, x, t = our_setup(args)

    def step():
        model.cleargrads()
        loss = F.softmax_cross_entropy(model(x), t)
        loss.backward()

    seconds = median_seconds(step, cupy.cuda.Device().synchronize, args.warmup, args.iters)
    timer = TimerHook()
    with timer:
        step()
    properties = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    from kfac_mn import backend

    cudnn = backend.load_cudnn_frontend() if args.conv_backend == "cudnn" else None
    return {"seconds": seconds, "device": properties["name"].decode(),
            "cupy": cupy.__version__, "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
            "cudnn": cudnn.backend_version() if cudnn else None,
            "cudnn_frontend": getattr(cudnn, "__version__", None) if cudnn else None,
            "pool_mb": cupy.get_default_memory_pool().total_bytes() / 2 ** 20,
            "profile": [list(row) for row in timer.summary()[:12]]}


def run_torch(args):
    try:
        import torch
    except ImportError:
        return {"error": "torch is not installed"}
    if not torch.cuda.is_available():
        return {"error": f"torch {torch.__version__} has no usable CUDA device "
                         f"(torch.version.cuda = {torch.version.cuda})"}
    sys.path.insert(0, ROOT)
    from models.torch_resnet50 import TorchResNet50

    device = torch.device("cuda")
    torch.manual_seed(0)
    x = torch.randn(args.batchsize, 3, args.size, args.size, device=device)
    t = torch.randint(0, 1000, (args.batchsize,), device=device)
    loss_fn = torch.nn.CrossEntropyLoss()

    def measure(model, tf32, autotune, amp=False):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = autotune
        model.train()

        def step():
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                loss = loss_fn(model(x), t)
            loss.backward()

        return median_seconds(step, torch.cuda.synchronize, args.warmup, args.iters)

    twin = TorchResNet50(n_class=1000).to(device)
    torch.cuda.reset_peak_memory_stats()
    result = {"seconds": measure(twin, tf32=False, autotune=False),
              "peak_mb": torch.cuda.max_memory_allocated() / 2 ** 20,
              "version": torch.__version__,
              "autotuned_seconds": measure(twin, tf32=False, autotune=True),
              "tf32_seconds": measure(twin, tf32=True, autotune=False),
              "amp_seconds": measure(twin, tf32=False, autotune=False, amp=True)}
    try:
        from torchvision.models import resnet50
    except ImportError:
        result["torchvision_seconds"] = None
    else:
        result["torchvision_seconds"] = measure(resnet50().to(device), tf32=False,
                                                autotune=False)
    return result


def kfac_steps(optimizer, model, x, t, count):
    """Seconds and per-stage seconds (K-FAC's timer; none for SGD) of ``count`` steps."""
    from kfac_mn import backend
    from kfac_mn import functions as F

    device = backend.cupy.cuda.Device()
    records = []
    for _ in range(count):
        device.synchronize()
        start = time.perf_counter()
        optimizer.update(lambda a, b: F.softmax_cross_entropy(model(a), b), x, t)
        device.synchronize()
        timer = getattr(optimizer, "timer", None)
        records.append({"seconds": time.perf_counter() - start,
                        "stages": {} if timer is None else dict(timer.seconds)})
    return records


def summary(records):
    """Median seconds and the per-stage seconds of the median step."""
    ordered = sorted(records, key=lambda r: r["seconds"])
    middle = ordered[len(ordered) // 2]
    return {"seconds": middle["seconds"],
            "stages": {k: round(v, 5) for k, v in middle["stages"].items()}}


def run_kfac(args):
    from kfac_mn.fisher.refresh_schedule import StatisticsSchedule
    from kfac_mn.optimizers import KFAC, MomentumSGD

    cupy, model, x, t = our_setup(args)
    result = {}
    batched = args.batched_inversion
    sgd = MomentumSGD(lr=1e-4)
    sgd.setup(model)
    kfac_steps(sgd, model, x, t, args.warmup)
    result["sgd"] = summary(kfac_steps(sgd, model, x, t, args.iters))
    for name, factor_dtype in (("kfac_every_step", None), ("kfac_every_step_float16", "float16")):
        every = KFAC(lr=1e-4, schedule=StatisticsSchedule("fixed"), factor_dtype=factor_dtype,
                     batched_inversion=batched)
        every.setup(model)
        kfac_steps(every, model, x, t, 1)
        result[name] = summary(kfac_steps(every, model, x, t, args.kfac_steps))
    interval = args.stale_interval
    stale = KFAC(lr=1e-4, schedule=StatisticsSchedule("fixed", factor_interval=interval,
                                                      inverse_interval=interval),
                 batched_inversion=batched)
    stale.setup(model)
    cycle = kfac_steps(stale, model, x, t, interval)  # step 0 refreshes, 1 .. interval-1 not
    result["kfac_refresh_step"] = summary(cycle[:1])
    result["kfac_stale"] = summary(cycle[1:])
    result["kfac_cycle_mean_seconds"] = sum(r["seconds"] for r in cycle) / interval
    result["pool_mb"] = cupy.get_default_memory_pool().total_bytes() / 2 ** 20
    return result


def run_dkfac(args):
    import numpy as np

    from kfac_mn.communicators import create_communicator
    from kfac_mn.fisher.refresh_schedule import StatisticsSchedule
    from kfac_mn.optimizers import DistributedKFAC

    cupy, model, x, t = our_setup(args)
    comm = create_communicator("nccl")
    optimizer = DistributedKFAC(comm, lr=1e-4, schedule=StatisticsSchedule("fixed"),
                                comm_dtype=np.float16)
    optimizer.setup(model)
    kfac_steps(optimizer, model, x, t, 1)
    records = kfac_steps(optimizer, model, x, t, args.kfac_steps)
    report = optimizer.last_step_report
    return {**summary(records),
            "report_stages": {name: round(stage["seconds"], 5)
                              for name, stage in report["stages"].items()},
            "world_size": comm.size}


def spawn(part, args):
    worker, options = PARTS[part]
    command = [sys.executable, os.path.abspath(__file__), "--worker", worker, *options]
    for name in ("batchsize", "size", "iters", "warmup", "kfac_steps", "stale_interval"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    try:
        out = subprocess.run(command, capture_output=True, text=True, env=env,
                             timeout=args.worker_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {args.worker_timeout} s"}
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        sys.stderr.write(out.stderr)
        last = out.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {out.returncode}: {last[0]}"}
    return json.loads(lines[-1])


def fmt(value, digits=4):
    return "-" if value is None else f"{value:.{digits}f}"


def ratio(numerator, denominator):
    return numerator / denominator if numerator and denominator else None


def report(args, results):
    torch, kfac, fast, dkfac = (results[p] for p in ("torch", "kfac", "kfac_cudnn", "dkfac"))
    ours = results["ours"]
    seconds = {part: results[part].get("seconds") for part in PARTS}
    torch_s, amp_s = torch.get("seconds"), torch.get("amp_seconds")
    print(f"ResNet-50 forward+backward, batch {args.batchsize}, {args.size}x{args.size}, "
          f"{ours.get('device', '?')} (median of {args.iters} after {args.warmup})")
    print(f"{'':40s} {'s/iter':>8s} {'/ PyTorch':>10s}")
    rows = [("ours", "kfac_mn, im2col, float32", torch_s),
            ("ours_cudnn", "kfac_mn, cuDNN graphs, float32", torch_s),
            ("ours_float16", "kfac_mn, im2col, float16", amp_s),
            ("ours_cudnn_float16", "kfac_mn, cuDNN graphs, float16", amp_s)]
    for part, label, reference in rows:
        print(f"{label:40s} {fmt(seconds[part]):>8s} {fmt(ratio(seconds[part], reference), 2):>10s}"
              f"  {results[part].get('error', '')}")
    print(f"{'PyTorch twin, strict float32':40s} {fmt(torch_s):>8s}  {torch.get('error', '')}")
    for key, label in (("amp_seconds", "PyTorch twin, AMP float16"),
                       ("autotuned_seconds", "PyTorch twin, cuDNN autotuned"),
                       ("tf32_seconds", "PyTorch twin, TF32 on"),
                       ("torchvision_seconds", "torchvision resnet50 (v1.5)")):
        if key in torch:
            print(f"{label:40s} {fmt(torch[key]):>8s}")
    print("(float16 rows are divided by PyTorch's AMP, float32 rows by strict float32)")
    for part in ("ours", "ours_cudnn"):
        if "profile" in results[part]:
            print(f"\n{part} profile, one synchronised step (TimerHook):")
            for label, calls, forward, backward in results[part]["profile"]:
                print(f"  {label:26s} {calls:5d} {forward:8.4f} {backward:8.4f}")
    steps = [("sgd", "MomentumSGD"), ("kfac_every_step", "K-FAC, every step"),
             ("kfac_every_step_float16", "K-FAC, every step, float16 factors"),
             ("kfac_refresh_step", f"K-FAC, refresh (1 in {args.stale_interval})"),
             ("kfac_stale", "K-FAC, stale step")]
    for name, part in (("im2col, one factor at a time", kfac),
                       ("cuDNN graphs, batched inversion", fast)):
        print(f"\nOne optimizer step, ResNet-50 batch {args.batchsize} ({name}, median):")
        base = part.get("sgd", {}).get("seconds")
        for key, label in steps:
            step = part.get(key, {})
            times = f"{step['seconds'] / base:6.2f}x SGD" if step.get("seconds") and base else ""
            inversion = step.get("stages", {}).get("inversion")
            extra = f"  inversion {inversion:.4f} s" if inversion else ""
            print(f"  {label:38s} {fmt(step.get('seconds')):>8s} {times}{extra}")
        if "error" in part:
            print(f"  (failed: {part['error']})")
    print(f"  {'DistributedKFAC over NCCL, 1 rank':38s} {fmt(dkfac.get('seconds')):>8s} "
          f"{dkfac.get('error', '')}")

    def stage(part, key, name):
        return part.get(key, {}).get("stages", {}).get(name)

    def step_s(part, key):
        return part.get(key, {}).get("seconds")

    inversion = stage(kfac, "kfac_refresh_step", "inversion")
    batched_inversion = stage(fast, "kfac_refresh_step", "inversion")
    cudnn = results["ours_cudnn"]
    figures = {
        "device": ours.get("device"), "cupy": ours.get("cupy"),
        "cuda_runtime": ours.get("cuda_runtime"), "cudnn": cudnn.get("cudnn"),
        "cudnn_frontend": cudnn.get("cudnn_frontend"), "torch": torch.get("version"),
        "batchsize": args.batchsize, "size": args.size,
        "ours_fwd_bwd_s": seconds["ours"], "torch_fwd_bwd_s": torch_s,
        "ratio_ours_over_torch": ratio(seconds["ours"], torch_s),
        "ours_cudnn_fwd_bwd_s": seconds["ours_cudnn"],
        "ratio_cudnn_over_torch": ratio(seconds["ours_cudnn"], torch_s),
        "ours_float16_fwd_bwd_s": seconds["ours_float16"],
        "ours_cudnn_float16_fwd_bwd_s": seconds["ours_cudnn_float16"], "torch_amp_s": amp_s,
        "ratio_cudnn_float16_over_torch_amp": ratio(seconds["ours_cudnn_float16"], amp_s),
        "images_per_second_cudnn_float32": ratio(args.batchsize, seconds["ours_cudnn"]),
        "images_per_second_cudnn_float16": ratio(args.batchsize,
                                                 seconds["ours_cudnn_float16"]),
        "torch_autotuned_s": torch.get("autotuned_seconds"),
        "torch_tf32_s": torch.get("tf32_seconds"),
        "torchvision_fwd_bwd_s": torch.get("torchvision_seconds"),
        "ours_pool_mb": ours.get("pool_mb"), "torch_peak_mb": torch.get("peak_mb"),
        "sgd_step_s": step_s(kfac, "sgd"),
        "kfac_every_step_s": step_s(kfac, "kfac_every_step"),
        "kfac_every_step_float16_s": step_s(kfac, "kfac_every_step_float16"),
        "kfac_refresh_step_s": step_s(kfac, "kfac_refresh_step"),
        "kfac_stale_step_s": step_s(kfac, "kfac_stale"),
        "kfac_cycle_mean_s": kfac.get("kfac_cycle_mean_seconds"),
        "cudnn_sgd_step_s": step_s(fast, "sgd"),
        "cudnn_kfac_stale_step_s": step_s(fast, "kfac_stale"),
        "cudnn_kfac_refresh_step_s": step_s(fast, "kfac_refresh_step"),
        "cudnn_kfac_cycle_mean_s": fast.get("kfac_cycle_mean_seconds"),
        "refresh_inversion_s": inversion, "batched_refresh_inversion_s": batched_inversion,
        "inversion_speedup": ratio(inversion, batched_inversion),
        "inversion_speedup_vs_reported": ratio(REPORTED_INVERSION_S, batched_inversion),
        "stale_interval": args.stale_interval,
        "kfac_stages": {key: kfac[key]["stages"] for key, _ in steps
                        if isinstance(kfac.get(key), dict)},
        "cudnn_kfac_stages": {key: fast[key]["stages"] for key, _ in steps
                              if isinstance(fast.get(key), dict)},
        "dkfac_nccl_float16_every_step_s": dkfac.get("seconds"),
        "dkfac_report_stages": dkfac.get("report_stages"),
        "profile": {row[0]: {"calls": row[1], "forward_s": round(row[2], 5),
                             "backward_s": round(row[3], 5)} for row in ours.get("profile", [])},
        "cudnn_profile": {row[0]: {"calls": row[1], "forward_s": round(row[2], 5),
                                   "backward_s": round(row[3], 5)}
                          for row in cudnn.get("profile", [])},
        "errors": {p: results[p]["error"] for p in PARTS if "error" in results[p]},
    }
    for name, part, prefix in (("every_step", kfac, "kfac"), ("stale", kfac, "kfac"),
                               ("stale", fast, "cudnn_kfac")):
        key = "kfac_every_step" if name == "every_step" else "kfac_stale"
        figures[f"{prefix}_{name}_over_sgd"] = ratio(step_s(part, key), step_s(part, "sgd"))
    return figures


def describe_device():
    """One line: CuPy, the CUDA runtime, device 0 and NCCL, or why they cannot be used."""
    sys.path.insert(0, ROOT)
    from kfac_mn import backend

    if not backend.cupy_available:
        return "CuPy is not installed"
    cupy = backend.cupy
    try:
        name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        runtime = cupy.cuda.runtime.runtimeGetVersion()
    except Exception as exc:  # the driver or the device is missing: say which
        return f"CuPy {cupy.__version__} cannot use a CUDA device: {type(exc).__name__}: {exc}"
    nccl = "available" if backend.load_nccl() is not None else "missing"
    try:
        frontend = backend.load_cudnn_frontend()
        cudnn = (f"cuDNN {frontend.backend_version()} through cuDNN Frontend "
                 f"{getattr(frontend, '__version__', '?')}")
    except backend.CudnnUnavailable as error:
        cudnn = f"no cuDNN path: needs {error}"
    return (f"cupy {cupy.__version__}, CUDA runtime {runtime}, device 0: {name}, NCCL {nccl}, "
            f"{cudnn}")


def junit_counts(path):
    """Counts and the failed test ids of a pytest JUnit XML file (None when there is none)."""
    import xml.etree.ElementTree as ElementTree

    if not os.path.exists(path):
        return None
    root = ElementTree.parse(path).getroot()
    counts = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
    for suite in root.iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    counts["passed"] = (counts["tests"] - counts["failures"] - counts["errors"]
                        - counts["skipped"])
    counts["failed"] = [f"{case.get('classname')}::{case.get('name')}"
                        for case in root.iter("testcase")
                        if case.find("failure") is not None or case.find("error") is not None]
    return counts


def summarize(dest, elapsed):
    """gpu_check.sh's summary: ``dest``/gpu_check.json from its pieces; exit status 0 iff every
    GPU test passed (none skipped) and our forward+backward is at most 2x PyTorch's."""
    bench_path = os.path.join(dest, "gpu_bench.json")
    bench = None
    if os.path.exists(bench_path):
        with open(bench_path) as f:
            bench = json.load(f)
    tests = junit_counts(os.path.join(dest, "gpu_tests.xml"))
    nccl = junit_counts(os.path.join(dest, "gpu_nccl_tests.xml"))
    bench = bench or {}
    all_pass = all(t is not None and t["tests"] > 0 and not t["failed"] and not t["skipped"]
                   for t in (tests, nccl))

    def at_most(key, bound):
        value = bench.get(key)
        return None if value is None else value <= bound

    acceptance = {"every_gpu_test_passes": all_pass,
                  "resnet50_at_most_2x_pytorch": at_most("ratio_ours_over_torch", 2.0),
                  # issue 18: the cuDNN path
                  "cudnn_float32_at_most_1_3x_pytorch": at_most("ratio_cudnn_over_torch", 1.3),
                  "cudnn_float16_at_most_1_3x_pytorch_amp": at_most(
                      "ratio_cudnn_float16_over_torch_amp", 1.3),
                  "cudnn_kfac_stale_at_most_1_3x_sgd": at_most("cudnn_kfac_stale_over_sgd", 1.3),
                  "batched_inversion_4x_below_reported": None if bench.get(
                      "inversion_speedup_vs_reported") is None else
                  bench["inversion_speedup_vs_reported"] >= 4.0}
    ratio = bench.get("ratio_ours_over_torch")
    with open(os.path.join(dest, "gpu_check.json"), "w") as f:
        json.dump({"seconds": elapsed, "device": describe_device(), "gpu_tests": tests,
                   "nccl_tests_world_size_1": nccl, "bench": bench,
                   "acceptance": acceptance}, f, indent=1)
        f.write("\n")
    brief = {name: None if t is None else {k: t[k] for k in ("passed", "skipped", "failed")}
             for name, t in (("gpu_tests", tests), ("nccl_tests", nccl))}
    print(json.dumps({"seconds": elapsed, "acceptance": acceptance,
                      "ratio_ours_over_torch": ratio, **brief}))
    return 0 if all_pass and acceptance["resnet50_at_most_2x_pytorch"] else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batchsize", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--kfac-steps", type=int, default=3)
    parser.add_argument("--stale-interval", type=int, default=10)
    parser.add_argument("--conv-backend", choices=("im2col", "cudnn"), default="im2col",
                        help="a worker's convolutions and batch norm (the parts set it)")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                        help="a worker's weights and data (the parts set it)")
    parser.add_argument("--batched-inversion", action="store_true",
                        help="a K-FAC worker's inversion (the parts set it)")
    parser.add_argument("--worker-timeout", type=int, default=150,
                        help="seconds each part may take before it is reported as failed")
    parser.add_argument("--json", help="also write the JSON figures to this file")
    parser.add_argument("--describe-device", action="store_true",
                        help="print CuPy's version, the device and NCCL's presence, then exit")
    parser.add_argument("--summarize", metavar="DIR",
                        help="write DIR/gpu_check.json from the pieces scripts/gpu_check.sh "
                             "left there, then exit (0: acceptance met)")
    parser.add_argument("--elapsed", type=int, default=0, help="seconds, for --summarize")
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.describe_device:
        print(describe_device())
        return
    if args.summarize:
        sys.exit(summarize(args.summarize, args.elapsed))
    if args.worker:
        run = {"ours": run_ours, "torch": run_torch, "kfac": run_kfac, "dkfac": run_dkfac}
        print(json.dumps(run[args.worker](args)))
        return
    sys.path.insert(0, ROOT)
    from kfac_mn import backend

    if backend.gpu_available():
        results = {part: spawn(part, args) for part in PARTS}
    else:
        missing = {"error": "needs CuPy and a visible CUDA device (not found)"}
        results = {part: dict(missing) for part in PARTS}
        results["torch"] = spawn("torch", args)
    figures = report(args, results)
    text = json.dumps(figures)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(text)
    # torch is optional; our own parts are not
    sys.exit(1 if set(figures["errors"]) - {"torch"} else 0)


if __name__ == "__main__":
    main()
