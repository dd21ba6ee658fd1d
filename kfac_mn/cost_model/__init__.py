"""Cost model of one training iteration on P workers: SGD, K-FAC every step, stale K-FAC.

Modules: :mod:`~kfac_mn.cost_model.machine` (the rates of a worker and its links),
:mod:`~kfac_mn.cost_model.trace` (a model's calls and work items),
:mod:`~kfac_mn.cost_model.stage_costs` (seconds per stage),
:mod:`~kfac_mn.cost_model.bytes_per_step` (bytes per rank and step),
:mod:`~kfac_mn.cost_model.calibration` (measuring this machine) and
:mod:`~kfac_mn.cost_model.comparison` (the model next to measured runs).
``scripts/scale_model.py`` is its command line, table and plot.

Weak scaling, as in the paper: every worker keeps ``--batchsize`` examples (32 by default) and
the global batch grows with P.  One iteration on P workers is modelled stage by stage (the
stages of ``DistributedKFAC``, the paper's Figure 1):

* forward_backward (stage 1): per function of the model, traced once at batch 1,
  ``GEMM flops / flops + bytes moved / mem_bandwidth + latency``.  A convolution's GEMMs are
  ``2 b S K O`` flops forward (S output positions, K = C kh kw, O output channels) and twice
  that backward (once when its input is the data); with ``im2col`` (our CPU code; cuDNN on a
  GPU needs none) the patches are written and read once forward and twice backward.  Other
  functions move a fixed number of activation-sized arrays (``ELEMENTWISE_PASSES``).
* factors (stage 1, due layers): A = patches^T patches (``2 b S K^2`` flops, plus writing and
  reading the patches of a convolution), G (``2 b S O^2``); BN: the per-example gamma / beta
  gradients (3 activation passes).
* reduce_scatter (stage 2): a float64 all-gather of the agreement vector, then the
  ReduceScatterV of the packed buffer of ``kfac_mn.distributed.packed_layout`` (gradients and
  upper triangles of the due statistics, grouped by owner).  SGD: a ring all-reduce of the
  gradients.
* owner_work (stage 3): on the most loaded rank of the actual assignment
  (``kfac_mn.distributed.assignment``, greedy by default): folding the new statistics into the
  running factors (3 passes over each factor), inversion ``d^3`` flops per d x d factor
  (Cholesky d^3/3 plus the inverse of the triangle 2 d^3/3) at ``inv_flops``, and the
  preconditioning ``2 O^2 K' + 2 O K'^2`` at ``fp32_flops`` (BN: a few passes over 2C values).
* allgather (stage 4): the AllGatherV of the preconditioned gradients (plus the schedule state).
  Both stages also pack and unpack their buffer (``packing_seconds``): a cost per tensor and
  per value, gradients and statistics (upper triangles) apart; on one worker that is all they
  cost.
* update (stage 5): momentum SGD and the weight rescaling, 7 parameter-sized float32 passes.

Collectives, alpha-beta model (``alpha`` s per message, ``bandwidth`` B/s per link, plus
``call_overhead`` s of software per library call), with the formulas of
:mod:`kfac_mn.communicators.v_collectives`, the ones the communicators' ``auto`` chooses by.
The ReduceScatterV of stage 2 and the AllGatherV of stage 4 (and stage 2's agreement
all-gather) run one of its algorithms (``--kfac-collectives``): ``native``, a ring paced by
the largest owner segment at each of its P-1 steps, ``(P-1)(alpha + max_r s_r /
bandwidth)``, so one owner per layer pays the largest segment P-1 times; ``two_phase``, an
equal-count ring over P equal chunks, ``(P-1)(alpha + B / P / bandwidth)``, plus the slowest
rank's redistribution of chunk pieces to or from the owners; ``allreduce`` (the authors'
stand-in), ``2(P-1)(alpha + B / P / bandwidth)``; ``auto``, the cheapest of the three per call.
SGD: a ring all-reduce of the gradients.

Stale K-FAC (``--stale-interval M``): every layer refreshes its factors and inverse once in M
steps, so factors, statistics traffic and inversions are divided by M and the
preconditioning stays (the stage-2 segment of rank r is its gradients plus 1/M of its
statistics: an average, not the worst step).

Defaults (:data:`~kfac_mn.cost_model.machine.V100_EDR`, our assumptions, not the paper's
figures): one Tesla V100 per worker with 50 TFLOP/s effective fp16 tensor-core GEMMs (40% of
125 peak), 12 TFLOP/s effective fp32 GEMMs (of 15.7), 5 TFLOP/s for Cholesky-based inversion
(cuSOLVER, large factors), 750 GB/s effective HBM2 bandwidth (of 900), 10 us per kernel
launch, 5 us of software per collective call, 30 us per packed tensor (60 us in float16),
16 ps per packed gradient value and 32 ps per statistic value (3 and 6 passes over float32
bytes), fp16 activations and communication (2 bytes), cuDNN (no im2col); InfiniBand EDR
between workers, alpha = 2 us and 12.5 GB/s per link, one flat ring.
:mod:`~kfac_mn.cost_model.calibration` measures another machine's: float32 GEMM and
inversion rates, memory bandwidth and per-function latency of our autograd in this process;
under MPI, alpha and bandwidth by a ping-pong, the overhead of one call of our communicator,
and the packing costs of stages 2 and 4 (``packing_parameters``).
"""
