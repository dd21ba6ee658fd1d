"""Loader throughput against bare Pillow decoding, on a folder of real JPEG photos.

Builds an ImageNet-layout folder in a temporary directory from the photos scikit-image
ships (``utils.data.sample_photos``; several hundred JPEGs, longer side 400-500 px), then for
each worker count W measures, in images per second:

- bare: W processes, each decoding its share of the files with ``utils.data.image_decoding.
  decode_rgb`` (``Image.open`` + ``load``, converted to RGB only when not RGB already:
  exactly the decode step of the pipeline, nothing else);
- pipeline: ``ShardedLoader`` with W workers running the training transform
  (random-resized crop to 224, flip, ImageNet normalisation) and batching into float32
  NCHW arrays delivered to this process.

Both timings include starting the processes. The machine may be shared, so the two are
measured in alternation (``--repeats`` pairs, which one goes first alternating too); the
table gives the best rate of each and the ratio of the bests, plus the lowest and highest
ratio within a pair, and the same ratio for images per CPU-second (CPU time of every
process of the run, which other users' load disturbs much less than wall time). A second
table splits the per-image cost of the training transform into its steps, timed in the
order the transform runs them on each file so that caches are as cold as in a worker (CPU
time of one process, best of ``--repeats``). It also gives two ratios measured in one process,
without workers or hand-over: bare decoding against the whole transform, and against a
transform cut short after its resize (decode and bilinear resize only, what is left if the
float conversion moved to the consumer). The last line is one JSON object with every figure.
"""
import argparse
import json
import math
import multiprocessing
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import numpy  # noqa: E402

from utils.data.image_decoding import decode, decode_rgb, open_image  # noqa: E402
from utils.data.image_folder import ImageFolderDataset  # noqa: E402
from utils.data.loader import ShardedLoader  # noqa: E402
from utils.data.normalization import IMAGENET_MEAN, IMAGENET_STD, ChannelNormalizer  # noqa: E402
from utils.data.pillow_pixels import pixel_view  # noqa: E402
from utils.data.sample_photos import write_photo_tree  # noqa: E402
from utils.data.seeding import example_rng  # noqa: E402
from utils.data.transforms import TrainTransform, sample_crop_box  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512, help="JPEG files to generate")
    parser.add_argument("--classes", type=int, default=8, help="class folders")
    parser.add_argument("--long-side", type=int, nargs=2, default=(400, 500),
                        metavar=("MIN", "MAX"), help="longer image side range, pixels")
    parser.add_argument("--workers", type=int, nargs="+", default=(1, 2),
                        help="worker / process counts to measure")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--crop", type=int, default=224, help="training crop size")
    parser.add_argument("--epochs", type=int, default=2, help="passes over the files per run")
    parser.add_argument("--repeats", type=int, default=5,
                        help="bare / pipeline pairs per worker count (best kept)")
    args = parser.parse_args(argv)
    for flag, value, lowest in (("--images", args.images, 1), ("--classes", args.classes, 1),
                                ("--batch-size", args.batch_size, 1), ("--crop", args.crop, 1),
                                ("--epochs", args.epochs, 1), ("--repeats", args.repeats, 1),
                                ("--workers", min(args.workers), 1)):
        if value < lowest:
            parser.error(f"{flag} must be >= {lowest}, got {value}")
    if args.images < args.classes:
        parser.error(f"--images ({args.images}) must be at least --classes ({args.classes})")
    if not 0 < args.long_side[0] <= args.long_side[1]:
        parser.error(f"--long-side needs 0 < MIN <= MAX, got {args.long_side}")
    return args


def _cpu_seconds():
    """CPU time of this process plus its reaped children (user + system)."""
    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                          resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Measurement:
    """Images per second of wall-clock time and per CPU-second (all processes of a run)."""

    def __init__(self, images, wall_seconds, cpu_seconds):
        self.rate = images / wall_seconds
        self.cpu_rate = images / cpu_seconds


def _measured(run):
    """Run ``run() -> images`` and measure it (its processes are reaped when it returns)."""
    wall, cpu = time.perf_counter(), _cpu_seconds()
    images = run()
    return Measurement(images, time.perf_counter() - wall, _cpu_seconds() - cpu)


def _decode_share(paths, epochs):
    for _ in range(epochs):
        for path in paths:
            decode_rgb(path)


def bare_decode(paths, n_processes, epochs):
    """``n_processes`` processes decoding disjoint shares of ``paths``; returns the count."""
    processes = [multiprocessing.Process(target=_decode_share, args=(paths[k::n_processes],
                                                                     epochs))
                 for k in range(n_processes)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"decoding process exited with code {process.exitcode}")
    return len(paths) * epochs


def pipeline(dataset, transform, n_workers, batch_size, epochs):
    """Batches from a ``ShardedLoader`` with ``n_workers`` workers; returns the image count
    (the workers are joined when it returns)."""
    images = 0
    with ShardedLoader(dataset, batch_size, transform=transform, n_workers=n_workers,
                       last_batch="partial") as loader:
        for _ in range(epochs * loader.iterations_per_epoch):
            x, _ = next(loader)
            images += len(x)
    return images


def paired_rates(paths, dataset, transform, n, args):
    """``--repeats`` alternating (bare, pipeline) measurements with ``n`` processes."""
    pairs = []
    for repeat in range(args.repeats):
        runs = {
            "bare": lambda: bare_decode(paths, n, args.epochs),
            "pipeline": lambda: pipeline(dataset, transform, n, args.batch_size, args.epochs),
        }
        order = ("bare", "pipeline") if repeat % 2 == 0 else ("pipeline", "bare")
        measured = {name: _measured(runs[name]) for name in order}
        pairs.append((measured["bare"], measured["pipeline"]))
    return pairs


def stage_costs(paths, crop, repeats, batch_size):
    """Milliseconds per image of each step of the training transform, in this process, in
    the order the transform runs them on each file (so caches are as cold as in a worker),
    writing into the rows of a few batch-sized arrays; then the whole transform from the
    file, the transform cut short after its resize (``decode+resize``) and bare decoding,
    these three taking turns file by file. CPU time of this process (preemption by other
    users' processes does not count), best of ``repeats`` passes for each."""
    clock = time.process_time
    normalizer = ChannelNormalizer(IMAGENET_MEAN, IMAGENET_STD)
    transform = TrainTransform(normalizer, size=crop)
    batches = [numpy.empty((batch_size, 3, crop, crop), numpy.float32) for _ in range(3)]
    rows = [row for batch in batches for row in batch]
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    steps = ("example_rng", "open", "crop_box", "decode", "pixel_view", "resize_flip",
             "normalise")

    def transformed(k, path):
        with open_image(path) as image:
            transform(image, example_rng(0, 0, k, 0), rows[k % len(rows)])

    def decoded_and_resized(k, path):
        with open_image(path) as image:
            left, top, width, height = sample_crop_box(*image.size, scale, ratio,
                                                       example_rng(0, 0, k, 0))
            pixels = pixel_view(decode(image))
            cv2.resize(pixels[top:top + height, left:left + width], (crop, crop))

    whole_file = {"file->example": transformed, "decode+resize": decoded_and_resized,
                  "bare_decode": lambda k, path: decode_rgb(path)}
    variants = tuple(whole_file)
    best = dict.fromkeys(steps + variants, math.inf)
    for _ in range(repeats):
        totals = dict.fromkeys(steps + variants, 0.0)
        for k, path in enumerate(paths):
            times = [clock()]
            rng = example_rng(0, 0, k, 0)
            times.append(clock())
            with open_image(path) as image:
                times.append(clock())
                left, top, width, height = sample_crop_box(*image.size, scale, ratio, rng)
                flip = rng.random() < 0.5
                times.append(clock())
                decoded = decode(image)
                times.append(clock())
                pixels = pixel_view(decoded)
                times.append(clock())
                resized = cv2.resize(pixels[top:top + height, left:left + width], (crop, crop))
                if flip:
                    cv2.flip(resized, 1, dst=resized)
                times.append(clock())
                normalizer(resized, rows[k % len(rows)])
                times.append(clock())
            for step, start, end in zip(steps, times, times[1:]):
                totals[step] += end - start
        for k, path in enumerate(paths):
            # Whole-file variants take turns on each file, so that a change in the
            # machine's speed during the pass reaches all of them alike.
            turn = k % len(variants)
            for name in variants[turn:] + variants[:turn]:
                start = clock()
                whole_file[name](k, path)
                totals[name] += clock() - start
        best = {name: min(best[name], totals[name]) for name in best}
    return {name: 1e3 * seconds / len(paths) for name, seconds in best.items()}


def main(argv=None):
    args = parse_args(argv)
    cv2.setNumThreads(1)  # as in the loader: one core per process
    per_class = -(-args.images // args.classes)
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as root:
        write_photo_tree(root, args.classes, per_class, seed=0, long_side=args.long_side)
        dataset = ImageFolderDataset(root)
        paths = [dataset.path(i) for i in range(len(dataset))]
        sizes = [decode_rgb(path).size for path in paths]  # also warms the page cache
        transform = TrainTransform(ChannelNormalizer(IMAGENET_MEAN, IMAGENET_STD),
                                   size=args.crop)
        results = {n: paired_rates(paths, dataset, transform, n, args) for n in args.workers}
        stages = stage_costs(paths, args.crop, args.repeats, args.batch_size)
    mean_width = sum(w for w, _ in sizes) / len(sizes)
    mean_height = sum(h for _, h in sizes) / len(sizes)
    print(f"{len(paths)} JPEG files in {args.classes} classes, mean {mean_width:.0f} x "
          f"{mean_height:.0f} px; train transform to {args.crop} px, batch {args.batch_size}, "
          f"{args.epochs} epoch(s) per run; {args.repeats} alternating pairs of runs")
    print("images/s, best run of each; ratio = pipeline / bare of the bests, and the lowest to "
          "highest ratio within a pair; cpu ratio = the same for images per CPU-second "
          "(all processes), which load from other users disturbs less")
    print(f"{'workers':>7}  {'bare decode':>11}  {'pipeline':>8}  {'ratio':>5}  "
          f"{'pair ratios':>11}  {'cpu ratio':>9}")
    figures = {"images": len(paths), "mean_width": round(mean_width),
               "mean_height": round(mean_height), "crop": args.crop,
               "batch_size": args.batch_size, "repeats": args.repeats}
    for n, pairs in results.items():
        bare = max(b.rate for b, _ in pairs)
        piped = max(p.rate for _, p in pairs)
        ratios = [p.rate / b.rate for b, p in pairs]
        cpu_ratio = max(p.cpu_rate for _, p in pairs) / max(b.cpu_rate for b, _ in pairs)
        print(f"{n:>7}  {bare:>11.1f}  {piped:>8.1f}  {piped / bare:>5.2f}  "
              f"{min(ratios):>5.2f}-{max(ratios):<5.2f}  {cpu_ratio:>9.2f}")
        figures[f"bare_{n}"] = round(bare, 1)
        figures[f"pipeline_{n}"] = round(piped, 1)
        figures[f"ratio_{n}"] = round(piped / bare, 3)
        figures[f"pair_ratio_min_{n}"] = round(min(ratios), 3)
        figures[f"pair_ratio_max_{n}"] = round(max(ratios), 3)
        figures[f"cpu_ratio_{n}"] = round(cpu_ratio, 3)
    print("\nsteps of the training transform in the order it runs them, one process, "
          "ms per image:")
    for name, cost in stages.items():
        print(f"  {name:<17} {cost:6.3f}")
    in_process = stages["bare_decode"] / stages["file->example"]
    resize_only = stages["bare_decode"] / stages["decode+resize"]
    print(f"in one process, no workers: bare_decode / file->example = {in_process:.2f} (the "
          f"transform), bare_decode / decode+resize = {resize_only:.2f} (decode and resize only)")
    figures["stage_ms"] = {name: round(cost, 4) for name, cost in stages.items()}
    figures["in_process_ratio"] = round(in_process, 3)
    figures["resize_only_ratio"] = round(resize_only, 3)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
