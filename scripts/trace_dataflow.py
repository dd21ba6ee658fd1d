"""Teaching trace of one distributed K-FAC step: the paper's Figure 1, two ranks, four layers.

``python scripts/trace_dataflow.py`` re-runs itself under ``mpiexec -n 2`` and runs ONE step of
:class:`kfac_mn.optimizers.DistributedKFAC` on a small network (conv1 -> bn1 -> relu -> conv2
-> relu -> fc, MNIST-shaped random inputs, a few examples per rank), calling the five stages
one by one, exactly as ``DistributedKFAC.update`` does.  After each stage every rank describes
what it holds, and rank 0 prints, stage by stage and rank by rank:

- which layer's tensors exist (local sums, global sums, running factors, inverses, local,
  mean or preconditioned gradients) and their shapes;
- who owns which layer, and the layout of the packed buffers (segments grouped by owner), what
  each rank sends to each owner (stage 2) and each owner to every rank (stage 4, with the
  trailer of schedule state after its gradients);
- the bytes each rank sent and received in each collective (ring model, see
  ``kfac_mn.communicators.traffic``);
- the values of one layer (``--follow``, default ``/fc``): a fingerprint (norm and first values)
  of its gradient and statistics on every rank, so that one sees the local gradients differ,
  the owner receive their mean, and the preconditioned gradient land identically everywhere.

It also writes a PNG diagram of that data flow (``--png``, under ``result/`` by default).  The
last line is one JSON object.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from kfac_mn import Chain  # noqa: E402
from kfac_mn import functions as F  # noqa: E402
from kfac_mn import links as L  # noqa: E402
from kfac_mn.communicators.mpiexec import inside_mpi_job, run_under_mpiexec  # noqa: E402
from kfac_mn.distributed import packed_layout, trailer  # noqa: E402

STAGE_TITLES = (
    "1 compute_local_statistics: forward/backward on the local batch",
    "2 reduce_scatter_statistics: ReduceScatterV of one packed buffer, ordered by owner",
    "3 precondition_owned_layers: owner-only running factors, inverses, G^-1 dW A^-1",
    "4 allgather_preconditioned_gradients: AllGatherV of the owners' gradients",
    "5 apply_update: momentum SGD, the same on every rank",
)
GRADIENTS = (
    "each rank's local mean gradient (its own batch)",
    "mean over ranks for the layers a rank owns, still local elsewhere",
    "preconditioned for the layers a rank owns, still local elsewhere",
    "preconditioned, every layer, the same on every rank (gathered)",
    "consumed: the weights moved by the same step on every rank",
)
GRADIENT_LABELS = ("local", "owned: mean", "owned: preconditioned", "all preconditioned",
                   "applied")


class SmallNet(Chain):
    """conv1 (1 -> 4, 3x3/2) -> bn1 -> relu -> conv2 (4 -> 8, 3x3/2) -> relu -> fc (392 -> 10):
    a convolution, a batch normalization and a linear layer, each with its Fisher block."""

    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.conv1 = L.Convolution2D(1, 4, 3, 2, 1)
            self.bn1 = L.BatchNormalization(4)
            self.conv2 = L.Convolution2D(4, 8, 3, 2, 1)
            self.fc = L.Linear(8 * 7 * 7, 10)

    def forward(self, x):
        return self.fc(F.relu(self.conv2(F.relu(self.bn1(self.conv1(x))))))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--png", default=os.path.join("result", "trace_dataflow.png"),
                        help="diagram to write")
    parser.add_argument("--follow", default="/fc", metavar="LAYER",
                        help="the layer whose values are followed through the stages "
                             "(/conv1, /bn1, /conv2 or /fc)")
    parser.add_argument("--ranks", type=int, default=2, help="MPI ranks (Figure 1: 2)")
    parser.add_argument("--batch", type=int, default=4, help="examples per rank")
    parser.add_argument("--comm-dtype", default="float32", choices=("float16", "float32"),
                        help="dtype of the communication buffers")
    args = parser.parse_args(argv)
    if args.ranks < 1:
        parser.error(f"--ranks must be >= 1, got {args.ranks}")
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    if args.follow not in LAYERS:
        parser.error(f"--follow {args.follow}: not a layer of the traced network (choose "
                     f"{', '.join(LAYERS)})")
    return args


LAYERS = ("/conv1", "/bn1", "/conv2", "/fc")


def fingerprint(array):
    """Norm and first three values of ``array``: enough to tell arrays apart at a glance."""
    flat = np.asarray(array, dtype=np.float64).ravel()
    first = ", ".join(f"{value:+.4e}" for value in flat[:3])
    return f"|x| {np.linalg.norm(flat):.6e} [{first}, ...]"


def followed_values(optimizer, path):
    """This rank's arrays of the followed layer: its first parameter's gradient, and the
    statistic sums, running factors and inverses it holds."""
    block = optimizer.fisher_blocks[path]
    param = block.params()[0]
    values = {f"{param.name}.grad": None if param.grad is None else np.array(param.grad)}
    for kind, store in (("sum", block.sums), ("factor", block.factors),
                        ("inverse", block.inverses)):
        for name, value in store.items():
            values[f"{kind} {name}"] = np.array(value)
    return values


def shape_text(shape):
    return "x".join(str(n) for n in shape) if shape else "scalar"


def tensors_of(optimizer, path):
    """What this rank holds for layer ``path``: {kind: text} in a fixed order."""
    block = optimizer.fisher_blocks[path]
    held = {}
    if block.sums:
        held["sums"] = ", ".join(f"{name} {shape_text(value.shape)} (count {block.counts[name]})"
                                 for name, value in block.sums.items())
    if block.factors:
        held["factors"] = ", ".join(f"{name} {shape_text(value.shape)}"
                                    for name, value in block.factors.items())
    if block.inverses:
        held["inverses"] = ", ".join(f"{name}_d^-1 {shape_text(value.shape)}"
                                     for name, value in block.inverses.items())
    held["grads"] = ", ".join(f"{param.name}.grad {shape_text(param.grad.shape)}"
                              for param in block.params() if param.grad is not None) or "none"
    return held


def describe_rank(optimizer, stage, report):
    """This rank's view after ``stage``: bytes per collective and tensors per layer."""
    collectives = report.stages[stage]["collectives"]
    return {
        "collectives": {op: (c["bytes_sent"], c["bytes_received"])
                        for op, c in collectives.items()},
        "layers": {path: tensors_of(optimizer, path) for path in optimizer.fisher_blocks},
    }


def layout_lines(segments, size):
    counts = packed_layout.counts_by_owner(segments, size)
    lines = []
    for rank in range(size):
        parts = [f"{segment.label} {shape_text(segment.shape)}"
                 + (" (upper triangle)" if segment.triangle else "") + f" = {segment.size}"
                 for segment in segments if segment.owner == rank]
        lines.append(f"  owner rank {rank}: {counts[rank]} values: "
                     + ("; ".join(parts) if parts else "nothing (owns no layer)"))
    return lines


def transfers(counts, itemsize, to_owners):
    """``[(sender, receiver, values, bytes)]``: what each rank's buffer carries to each owner
    (stage 2: rank r's contribution to owner o's segment) or from each owner to every rank
    (stage 4).  With two ranks this is exactly what travels; with more, the ring of
    ``kfac_mn.communicators.traffic`` forwards the same segments in P - 1 hops."""
    moves = []
    for owner, count in enumerate(counts):
        for other in range(len(counts)):
            if other != owner:
                sender, receiver = (other, owner) if to_owners else (owner, other)
                moves.append((sender, receiver, count, count * itemsize))
    return moves


def transfer_lines(moves, what):
    return [f"  rank {sender} -> rank {receiver}: {what(sender, receiver)}, {values} values = "
            f"{nbytes:,} B" for sender, receiver, values, nbytes in moves]


def follow_lines(path, owner, stage, fingerprints, checks):
    lines = [f"following {path} (owner: rank {owner}):"]
    for rank, values in enumerate(fingerprints):
        for name, text in values.items():
            lines.append(f"  rank {rank} {name}: {text}")
    return lines + [f"  {check}" for check in checks.get(stage, [])]


def print_stage(index, views, owners, extra_lines):
    print(f"\n=== Stage {STAGE_TITLES[index]} ===")
    for line in extra_lines:
        print(line)
    print(f"gradients now: {GRADIENTS[index]}")
    for rank, view in enumerate(views):
        moved = ", ".join(f"{op} sent {sent} B / received {received} B"
                          for op, (sent, received) in view["collectives"].items())
        print(f"rank {rank}: {moved or 'no communication'}")
        for path, held in view["layers"].items():
            mark = "owner" if owners[path] == rank else "     "
            print(f"  [{mark}] {path}: " + "; ".join(f"{k}: {v}" for k, v in held.items()))


def value_checks(follow, owner, values, size):
    """What the followed values show, stage by stage (rank 0, from every rank's arrays)."""
    grad = next(name for name in values[0][0] if name.endswith(".grad"))
    local = [stage[grad] for stage in values[0]]
    mean = sum(local) / size
    checks = {0: [f"local gradients differ between ranks: "
                  f"{'yes' if size > 1 and not np.allclose(local[0], local[1]) else 'no'}"]}
    received = values[1][owner][grad]
    error = float(np.max(np.abs(received - mean)))
    checks[1] = [f"the owner's gradient is the mean of the ranks' local gradients: "
                 f"{'yes' if np.allclose(received, mean, rtol=1e-5, atol=1e-7) else 'NO'} "
                 f"(largest difference {error:.1e})"]
    for name in [name for name in values[0][0] if name.startswith("sum ")]:
        total = sum(stage[name] for stage in values[0])
        agrees = np.allclose(values[1][owner][name], total, rtol=1e-5)
        checks[1].append(f"the owner's {name} is the sum of the ranks' local sums: "
                         f"{'yes' if agrees else 'NO'}")
    gathered = [stage[grad] for stage in values[3]]
    same = all(np.array_equal(gathered[0], other) for other in gathered[1:])
    checks[3] = [f"the preconditioned gradient is identical on every rank: "
                 f"{'yes' if same else 'NO'}; it equals the owner's after stage 3: "
                 f"{'yes' if np.array_equal(gathered[0], values[2][owner][grad]) else 'NO'}"]
    return checks, same


def run_worker(args):
    from kfac_mn.communicators import create_communicator
    from kfac_mn.fisher.refresh_schedule import StatisticsSchedule
    from kfac_mn.optimizers import DistributedKFAC
    from kfac_mn.optimizers.distributed_kfac import STAGES
    from kfac_mn.optimizers.step_report import StepReport

    comm = create_communicator()
    np.random.seed(0)
    model = SmallNet()
    optimizer = DistributedKFAC(comm, lr=0.1, momentum=0.9, damping=1e-2,
                                comm_dtype=np.dtype(args.comm_dtype),
                                schedule=StatisticsSchedule("adaptive")).setup(model)
    rng = np.random.default_rng(comm.rank)
    x = rng.random((args.batch, 1, 28, 28)).astype(np.float32)
    t = rng.integers(0, 10, args.batch).astype(np.int32)
    owners = dict(optimizer.owners)

    report = StepReport(comm)
    due = optimizer.due_layers()
    stages = (lambda: optimizer.compute_local_statistics(
                  due, lambda x, t: F.softmax_cross_entropy(model(x), t), x, t),
              lambda: optimizer.reduce_scatter_statistics(due),
              optimizer.precondition_owned_layers,
              optimizer.allgather_preconditioned_gradients,
              optimizer.apply_update)
    views, followed, trailers = [], [], None
    for index, (name, run_stage) in enumerate(zip(STAGES, stages)):
        if index == 3:  # what each owner appends to its gradients: its layers' schedule state
            mine = [path for path in optimizer.owned_layers()]
            trailers = comm.gather_obj(
                (mine, trailer.build_trailer(None, optimizer.schedule, mine, optimizer.t)))
        with report.stage(name):
            run_stage()
        views.append(comm.gather_obj(describe_rank(optimizer, name, report)))
        followed.append(comm.gather_obj(followed_values(optimizer, args.follow)))
    checksums = comm.gather_obj(float(sum(np.abs(param.data).sum()
                                          for param in model.params())))
    owned = comm.gather_obj(optimizer.owned_layers())
    owner_list = [owners[item.name] for item in optimizer.work_items]
    stage2 = packed_layout.reduce_scatter_segments(optimizer.work_items, owner_list, due)
    stage4 = packed_layout.allgather_segments(optimizer.work_items, owner_list)
    if comm.rank != 0:
        return
    itemsize = np.dtype(args.comm_dtype).itemsize
    counts2 = packed_layout.counts_by_owner(stage2, comm.size)
    counts4 = [count + len(values) for count, (_, values) in
               zip(packed_layout.counts_by_owner(stage4, comm.size), trailers)]
    moves2 = transfers(counts2, itemsize, to_owners=True)
    moves4 = transfers(counts4, itemsize, to_owners=False)
    owner = owners[args.follow]
    checks, same = value_checks(args.follow, owner, followed, comm.size)
    print(f"Distributed K-FAC, one step, {comm.size} ranks x {args.batch} examples "
          f"(random MNIST-shaped inputs), communication in {args.comm_dtype}")
    print("owners (greedy on estimated cost d^3 + d^2): "
          + ", ".join(f"rank {rank}: {', '.join(paths) or 'nothing'}"
                      for rank, paths in enumerate(owned)))
    extras = ([], ["packed buffer (the same layout on every rank):"]
              + layout_lines(stage2, comm.size)
              + ["what each rank's buffer carries to each owner:"]
              + transfer_lines(moves2, lambda s, r: f"its local sums of rank {r}'s segment"),
              [],
              ["gathered buffer (each owner contributes its layers' gradients, then a "
               "trailer):"] + layout_lines(stage4, comm.size)
              + [f"  trailer of rank {rank}: {len(values)} values, (interval, steps to the "
                 f"next refresh) of {', '.join(paths) or 'no layer'}: {values}"
                 for rank, (paths, values) in enumerate(trailers)]
              + ["what each owner sends to every other rank:"]
              + transfer_lines(moves4, lambda s, r: f"rank {s}'s preconditioned gradients "
                                                    "and trailer"),
              [f"weights after the step, sum |w| per rank: {checksums} "
               f"({'identical' if len(set(checksums)) == 1 else 'DIFFERENT'})"])
    for index in range(len(STAGES)):
        fingerprints = [{name: "none" if value is None else fingerprint(value)
                         for name, value in rank_values.items()}
                        for rank_values in followed[index]]
        print_stage(index, views[index], owners,
                    extras[index] + follow_lines(args.follow, owner, index, fingerprints,
                                                 checks))
    draw_diagram(args.png, views, owned, owners, (moves2, moves4), (counts2, counts4),
                 (stage2, stage4, trailers), args, followed)
    print(f"\nwrote {args.png}")
    totals = [{op: sent for op, (sent, _) in views[i][0]["collectives"].items()}
              for i in range(len(STAGES))]
    print(json.dumps({"ranks": comm.size, "owners": owned, "png": args.png,
                      "follow": args.follow, "rank0_bytes_sent_per_stage": totals,
                      "followed_identical_after_stage_4": same,
                      "identical_weights": len(set(checksums)) == 1}))


def cell_text(view, rank, owners):
    lines = []
    for path, held in view["layers"].items():
        kinds = [kind for kind in ("sums", "factors", "inverses") if kind in held]
        tag = "*" if owners[path] == rank else ""
        lines.append(f"{path}{tag}: " + (", ".join(kinds) if kinds else "-"))
    return "\n".join(lines)


def draw_buffer(ax, y, segments, counts, trailers, title, right):
    """One row per owner: its segments as labelled boxes (not to scale: one box each), in
    the width up to ``right``."""
    from matplotlib.patches import Rectangle

    ax.text(0.02, y + 0.28, title, fontsize=9, weight="bold")
    for rank, count in enumerate(counts):
        row_y = y - 0.32 * rank
        ax.text(0.02, row_y, f"owner rank {rank} ({count} values)", fontsize=8, va="center")
        parts = [(f"{s.label}\n{s.size}", f"C{s.owner}") for s in segments if s.owner == rank]
        if trailers is not None and trailers[rank][1]:
            parts.append((f"trailer\n{len(trailers[rank][1])}", "lightgray"))
        step = min(0.52, (right - 0.95) / max(1, len(parts)))
        for index, (text, colour) in enumerate(parts):
            left = 0.95 + step * index
            ax.add_patch(Rectangle((left, row_y - 0.12), step * 0.96, 0.24, facecolor=colour,
                                   alpha=0.35, edgecolor="black", lw=0.5))
            ax.text(left + step * 0.48, row_y, text, ha="center", va="center", fontsize=5.5)


def draw_diagram(path, views, owned, owners, moves, counts, layouts, args, followed):
    """Stages left to right, ranks top to bottom; an arrow per transfer of stages 2 and 4,
    labelled with what it carries and its bytes; below, the packed buffers by owner."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_ranks, n_stages = len(owned), len(views)
    buffer_rows = 2 * (n_ranks + 1.2) * 0.32
    fig, ax = plt.subplots(figsize=(3.3 * n_stages, 2.1 * n_ranks + 1.4 + 1.6 * buffer_rows))
    ax.set_xlim(0, n_stages)
    ax.set_ylim(-buffer_rows - 0.4, n_ranks + 0.4)
    ax.axis("off")
    for index, title in enumerate(STAGE_TITLES):
        number, name = title.split(":")[0].split(" ", 1)
        ax.text(index + 0.5, n_ranks + 0.25, f"{number}.\n{name}", ha="center", va="center",
                fontsize=9, weight="bold")
    for index, view_list in enumerate(views):
        for rank, view in enumerate(view_list):
            y = n_ranks - rank - 0.5
            value = next(v for k, v in followed[index][rank].items() if k.endswith(".grad"))
            norm = "-" if value is None else f"{np.linalg.norm(value):.4e}"
            sent = "".join(f"\n{op} sent {nbytes:,} B"
                           for op, (nbytes, _) in view["collectives"].items())
            ax.text(index + 0.5, y, f"rank {rank}\n" + cell_text(view, rank, owners)
                    + f"\ngrads: {GRADIENT_LABELS[index]}\n{args.follow} |grad| {norm}" + sent,
                    ha="center", va="center", fontsize=7, family="monospace",
                    bbox=dict(boxstyle="round", facecolor="#eef3fb" if rank % 2 else "#fbf3e8"))
    for stage, stage_moves in ((1, moves[0]), (3, moves[1])):
        what = "sums for" if stage == 1 else "gradients + trailer of"
        for sender, receiver, values, nbytes in stage_moves:
            y0, y1 = n_ranks - sender - 0.5, n_ranks - receiver - 0.5
            ax.annotate("", xy=(stage + 0.12, y1), xytext=(stage - 0.12, y0),
                        arrowprops=dict(arrowstyle="->", color=f"C{sender}", lw=1.0))
            owner = receiver if stage == 1 else sender
            ax.text(stage, (y0 + y1) / 2 + 0.1 * (1 if sender < receiver else -1),
                    f"{what} rank {owner}'s layers\n{values} values = {nbytes:,} B",
                    ha="center", fontsize=6, color=f"C{sender}",
                    bbox=dict(facecolor="white", edgecolor="none", alpha=0.8))
    stage2, stage4, trailers = layouts
    top = -0.35
    draw_buffer(ax, top, stage2, counts[0], None,
                "stage 2 buffer (the same layout on every rank), by owner:", n_stages)
    draw_buffer(ax, top - (n_ranks + 1.2) * 0.32, stage4, counts[1], trailers,
                "stage 4 buffer: each owner's preconditioned gradients, then its trailer:",
                n_stages)
    ax.text(0, n_ranks + 0.05, "* = layer owned by this rank (its second-order work is done "
            "there); boxes below: one per segment, with its number of values (not to scale)",
            fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if not inside_mpi_job():
        completed = run_under_mpiexec(args.ranks, os.path.abspath(__file__),
                                      sys.argv[1:] if argv is None else argv)
        sys.exit(completed.returncode)
    run_worker(args)


if __name__ == "__main__":
    main()
