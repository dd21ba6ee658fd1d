"""GPU figures: ResNet-50 forward+backward (ours vs PyTorch), K-FAC steps vs an SGD step.

    python scripts/bench_gpu.py [--batchsize 32] [--size 224] [--iters 10] [--json PATH]

Everything float32 on the current CUDA device, random data, 1000 classes.  Each part runs in
its own subprocess (its own GPU memory pool, its own failure):

* ``ours``: our ResNet-50 (``models.resnet50``, the paper's v1 with the stride in the 1x1
  convolution) forward + backward, median seconds over ``--iters`` after ``--warmup``; plus a
  per-function profile of one step (TimerHook, synchronised).
* ``torch``: the PyTorch twin of the same network (``models/torch_resnet50.py``), strict
  float32 (TF32 off for cuDNN and cuBLAS, cuDNN autotuning off: PyTorch's defaults except
  TF32); beside it, as information, cuDNN autotuning on, TF32 on (PyTorch's cuDNN default),
  and torchvision's ResNet-50 (v1.5) when torchvision is installed.  Without torch, or
  without CUDA in torch, the row says why and the ratio is null.
* ``kfac``: one step of MomentumSGD, of K-FAC refreshing and inverting every layer every step
  (float32 and ``factor_dtype='float16'`` factors), and of K-FAC on a stale step (factors and
  inverses of the last refresh reused; the refresh interval is ``--stale-interval``), with
  the per-stage seconds of the optimizer's timer.
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
WORKERS = ("ours", "torch", "kfac", "dkfac")


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
    np.random.seed(0)
    model = resnet50(n_class=1000).to_gpu()
    rng = np.random.default_rng(0)
    x = cupy.asarray(rng.standard_normal((args.batchsize, 3, args.size, args.size),
                                         dtype=np.float32))
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
    return {"seconds": seconds, "device": properties["name"].decode(),
            "cupy": cupy.__version__,
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

    def measure(model, tf32, autotune):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = autotune
        model.train()

        def step():
            model.zero_grad(set_to_none=True)
            loss_fn(model(x), t).backward()

        return median_seconds(step, torch.cuda.synchronize, args.warmup, args.iters)

    twin = TorchResNet50(n_class=1000).to(device)
    torch.cuda.reset_peak_memory_stats()
    result = {"seconds": measure(twin, tf32=False, autotune=False),
              "peak_mb": torch.cuda.max_memory_allocated() / 2 ** 20,
              "version": torch.__version__,
              "autotuned_seconds": measure(twin, tf32=False, autotune=True),
              "tf32_seconds": measure(twin, tf32=True, autotune=False)}
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
    sgd = MomentumSGD(lr=1e-4)
    sgd.setup(model)
    kfac_steps(sgd, model, x, t, args.warmup)
    result["sgd"] = summary(kfac_steps(sgd, model, x, t, args.iters))
    for name, factor_dtype in (("kfac_every_step", None), ("kfac_every_step_float16", "float16")):
        every = KFAC(lr=1e-4, schedule=StatisticsSchedule("fixed"), factor_dtype=factor_dtype)
        every.setup(model)
        kfac_steps(every, model, x, t, 1)
        result[name] = summary(kfac_steps(every, model, x, t, args.kfac_steps))
    interval = args.stale_interval
    stale = KFAC(lr=1e-4, schedule=StatisticsSchedule("fixed", factor_interval=interval,
                                                      inverse_interval=interval))
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


def spawn(worker, args):
    command = [sys.executable, os.path.abspath(__file__), "--worker", worker]
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


def report(args, results):
    ours, torch, kfac, dkfac = (results[w] for w in WORKERS)
    ours_s, torch_s = ours.get("seconds"), torch.get("seconds")
    ratio = ours_s / torch_s if ours_s and torch_s else None
    print(f"ResNet-50 forward+backward, batch {args.batchsize}, {args.size}x{args.size}, "
          f"float32, {ours.get('device', '?')} (median of {args.iters} after {args.warmup})")
    print(f"{'':34s} {'s/iter':>8s}")
    print(f"{'kfac_mn (CuPy)':34s} {fmt(ours_s):>8s}  {ours.get('error', '')}")
    print(f"{'PyTorch twin, strict float32':34s} {fmt(torch_s):>8s}  {torch.get('error', '')}")
    for key, label in (("autotuned_seconds", "PyTorch twin, cuDNN autotuned"),
                       ("tf32_seconds", "PyTorch twin, TF32 on"),
                       ("torchvision_seconds", "torchvision resnet50 (v1.5)")):
        if key in torch:
            print(f"{label:34s} {fmt(torch[key]):>8s}")
    print(f"ratio kfac_mn / PyTorch (strict float32): {fmt(ratio, 2)}")
    if "profile" in ours:
        print("\nkfac_mn profile, one synchronised step (TimerHook):")
        for label, calls, forward, backward in ours["profile"]:
            print(f"  {label:26s} {calls:5d} {forward:8.4f} {backward:8.4f}")
    print(f"\nOne optimizer step, ResNet-50 batch {args.batchsize} (median):")
    base = kfac.get("sgd", {}).get("seconds")
    rows = [("sgd", "MomentumSGD"), ("kfac_every_step", "K-FAC, every step"),
            ("kfac_every_step_float16", "K-FAC, every step, float16 factors"),
            ("kfac_refresh_step", f"K-FAC, refresh (1 in {args.stale_interval})"),
            ("kfac_stale", "K-FAC, stale step")]
    for key, label in rows:
        seconds = kfac.get(key, {}).get("seconds")
        times = f"{seconds / base:6.2f}x SGD" if seconds and base else ""
        print(f"  {label:38s} {fmt(seconds):>8s} {times}")
    if "error" in kfac:
        print(f"  (K-FAC part failed: {kfac['error']})")
    print(f"  {'DistributedKFAC over NCCL, 1 rank':38s} {fmt(dkfac.get('seconds')):>8s} "
          f"{dkfac.get('error', '')}")
    figures = {
        "device": ours.get("device"), "cupy": ours.get("cupy"), "torch": torch.get("version"),
        "batchsize": args.batchsize, "size": args.size, "dtype": "float32",
        "ours_fwd_bwd_s": ours_s, "torch_fwd_bwd_s": torch_s,
        "ratio_ours_over_torch": ratio,
        "torch_autotuned_s": torch.get("autotuned_seconds"),
        "torch_tf32_s": torch.get("tf32_seconds"),
        "torchvision_fwd_bwd_s": torch.get("torchvision_seconds"),
        "ours_pool_mb": ours.get("pool_mb"), "torch_peak_mb": torch.get("peak_mb"),
        "sgd_step_s": base,
        "kfac_every_step_s": kfac.get("kfac_every_step", {}).get("seconds"),
        "kfac_every_step_float16_s": kfac.get("kfac_every_step_float16", {}).get("seconds"),
        "kfac_refresh_step_s": kfac.get("kfac_refresh_step", {}).get("seconds"),
        "kfac_stale_step_s": kfac.get("kfac_stale", {}).get("seconds"),
        "kfac_cycle_mean_s": kfac.get("kfac_cycle_mean_seconds"),
        "stale_interval": args.stale_interval,
        "kfac_stages": {key: kfac[key]["stages"] for key, _ in rows
                        if isinstance(kfac.get(key), dict)},
        "dkfac_nccl_float16_every_step_s": dkfac.get("seconds"),
        "dkfac_report_stages": dkfac.get("report_stages"),
        "profile": {row[0]: {"calls": row[1], "forward_s": round(row[2], 5),
                             "backward_s": round(row[3], 5)} for row in ours.get("profile", [])},
        "errors": {w: results[w]["error"] for w in WORKERS if "error" in results[w]},
    }
    for name, key in (("every_step", "kfac_every_step_s"), ("stale", "kfac_stale_step_s")):
        seconds = figures[key]
        figures[f"kfac_{name}_over_sgd"] = seconds / base if seconds and base else None
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
    return f"cupy {cupy.__version__}, CUDA runtime {runtime}, device 0: {name}, NCCL {nccl}"


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
    ratio = bench.get("ratio_ours_over_torch") if bench else None
    all_pass = all(t is not None and t["tests"] > 0 and not t["failed"] and not t["skipped"]
                   for t in (tests, nccl))
    acceptance = {"every_gpu_test_passes": all_pass,
                  "resnet50_at_most_2x_pytorch": None if ratio is None else ratio <= 2.0}
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
        results = {worker: spawn(worker, args) for worker in WORKERS}
    else:
        missing = {"error": "needs CuPy and a visible CUDA device (not found)"}
        results = {worker: dict(missing) for worker in WORKERS}
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
