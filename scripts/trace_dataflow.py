"""Teaching trace of one distributed K-FAC step: the paper's Figure 1, two ranks, three layers.

``python scripts/trace_dataflow.py`` re-runs itself under ``mpiexec -n 2`` and runs ONE step of
:class:`kfac_mn.optimizers.DistributedKFAC` on a three-layer network (conv1 -> conv2 -> fc,
MNIST-shaped random inputs, a few examples per rank), calling the five stages one by one,
exactly as ``DistributedKFAC.update`` does.  After each stage every rank describes what it
holds, and rank 0 prints, stage by stage and rank by rank:

- which layer's tensors exist (local sums, global sums, running factors, inverses, local,
  mean or preconditioned gradients) and their shapes;
- who owns which layer, and the layout of the packed buffers (segments grouped by owner);
- the bytes each rank sent and received in each collective (ring model, see
  ``kfac_mn.communicators.traffic``).

It also writes a PNG diagram of that data flow (``--png``).  The last line is one JSON object.
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
from kfac_mn.distributed import packed_layout  # noqa: E402

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


class ThreeLayerNet(Chain):
    """conv1 (1 -> 4, 3x3/2) -> relu -> conv2 (4 -> 8, 3x3/2) -> relu -> fc (392 -> 10)."""

    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.conv1 = L.Convolution2D(1, 4, 3, 2, 1)
            self.conv2 = L.Convolution2D(4, 8, 3, 2, 1)
            self.fc = L.Linear(8 * 7 * 7, 10)

    def forward(self, x):
        return self.fc(F.relu(self.conv2(F.relu(self.conv1(x)))))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--png", default="trace_dataflow.png", help="diagram to write")
    parser.add_argument("--ranks", type=int, default=2, help="MPI ranks (Figure 1: 2)")
    parser.add_argument("--batch", type=int, default=4, help="examples per rank")
    parser.add_argument("--comm-dtype", default="float32", choices=("float16", "float32"),
                        help="dtype of the communication buffers")
    args = parser.parse_args(argv)
    if args.ranks < 1:
        parser.error(f"--ranks must be >= 1, got {args.ranks}")
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    return args


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


def run_worker(args):
    from kfac_mn.communicators import create_communicator
    from kfac_mn.optimizers import DistributedKFAC
    from kfac_mn.optimizers.distributed_kfac import STAGES
    from kfac_mn.optimizers.step_report import StepReport

    comm = create_communicator()
    np.random.seed(0)
    model = ThreeLayerNet()
    optimizer = DistributedKFAC(comm, lr=0.1, momentum=0.9, damping=1e-2,
                                comm_dtype=np.dtype(args.comm_dtype)).setup(model)
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
    views = []
    for name, run_stage in zip(STAGES, stages):
        with report.stage(name):
            run_stage()
        views.append(comm.gather_obj(describe_rank(optimizer, name, report)))
    checksums = comm.gather_obj(float(sum(np.abs(param.data).sum()
                                          for param in model.params())))
    owned = comm.gather_obj(optimizer.owned_layers())
    owner_list = [owners[item.name] for item in optimizer.work_items]
    stage2 = packed_layout.reduce_scatter_segments(optimizer.work_items, owner_list, due)
    stage4 = packed_layout.allgather_segments(optimizer.work_items, owner_list)
    if comm.rank != 0:
        return
    print(f"Distributed K-FAC, one step, {comm.size} ranks x {args.batch} examples "
          f"(random MNIST-shaped inputs), communication in {args.comm_dtype}")
    print("owners (greedy on estimated cost d^3 + d^2): "
          + ", ".join(f"rank {rank}: {', '.join(paths) or 'nothing'}"
                      for rank, paths in enumerate(owned)))
    extras = ([], ["packed buffer (the same layout on every rank):"]
              + layout_lines(stage2, comm.size), [],
              ["gathered buffer (each owner contributes its layers' gradients):"]
              + layout_lines(stage4, comm.size),
              [f"weights after the step, sum |w| per rank: {checksums} "
               f"({'identical' if len(set(checksums)) == 1 else 'DIFFERENT'})"])
    for index in range(len(STAGES)):
        print_stage(index, views[index], owners, extras[index])
    draw_diagram(args.png, views, owned, owners)
    print(f"\nwrote {args.png}")
    totals = [{op: sent for op, (sent, _) in views[i][0]["collectives"].items()}
              for i in range(len(STAGES))]
    print(json.dumps({"ranks": comm.size, "owners": owned, "png": args.png,
                      "rank0_bytes_sent_per_stage": totals,
                      "identical_weights": len(set(checksums)) == 1}))


def cell_text(view, rank, owners):
    lines = []
    for path, held in view["layers"].items():
        kinds = [kind for kind in ("sums", "factors", "inverses") if kind in held]
        tag = "*" if owners[path] == rank else ""
        lines.append(f"{path}{tag}: " + (", ".join(kinds) if kinds else "-"))
    return "\n".join(lines)


def draw_diagram(path, views, owned, owners):
    """Stages left to right, ranks top to bottom; crossing arrows are the collectives."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_ranks, n_stages = len(owned), len(views)
    fig, ax = plt.subplots(figsize=(3.1 * n_stages, 1.9 * n_ranks + 1.0))
    ax.set_xlim(0, n_stages)
    ax.set_ylim(-0.2, n_ranks + 0.4)
    ax.axis("off")
    for index, title in enumerate(STAGE_TITLES):
        ax.text(index + 0.5, n_ranks + 0.25, title.split(":")[0].replace(" ", ". ", 1),
                ha="center", va="center", fontsize=10, weight="bold")
    for index, view_list in enumerate(views):
        for rank, view in enumerate(view_list):
            y = n_ranks - rank - 0.5
            ax.text(index + 0.5, y, f"rank {rank}\n" + cell_text(view, rank, owners)
                    + "\ngrads: " + GRADIENT_LABELS[index],
                    ha="center", va="center", fontsize=8, family="monospace",
                    bbox=dict(boxstyle="round", facecolor="#eef3fb" if rank % 2 else "#fbf3e8"))
            sent = sum(s for s, _ in view["collectives"].values())
            if sent and index > 0:
                for target in range(n_ranks):
                    ax.annotate("", xy=(index + 0.08, n_ranks - target - 0.5),
                                xytext=(index - 0.08, y),
                                arrowprops=dict(arrowstyle="->", color="gray", lw=0.8))
                ax.text(index, y - 0.35, f"{', '.join(view['collectives'])}\n"
                        f"rank {rank} sends {sent:,} B", ha="center", fontsize=7, color="dimgray")
    ax.text(0, -0.15, "* = layer owned by this rank (its second-order work is done there)",
            fontsize=8)
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
