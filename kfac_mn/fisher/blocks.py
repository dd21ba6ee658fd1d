"""Fisher blocks: one per layer, in the conventions of docs/SPEC.md (section 3).

A block turns what the :class:`~kfac_mn.fisher.hook.KFACHook` saw during one
forward/backward (input activations ``a`` and output gradients ``g``) into
*sums over examples* (so that sums from micro-batches and from MPI ranks just
add up), then into averaged statistics, the running average, damped inverses,
and finally the preconditioned gradient.

Per-example gradients: the loss is a mean over the batch axis, so the backward
pass hands us ``g_n / N``; we multiply by ``N`` (the local batch) so that the
factors do not depend on how the global batch is split.

* Linear (W: out x in):  A = 1/N sum_n a_n a_n^T (a with a trailing 1 when
  there is a bias),  G = 1/N sum_n g_n g_n^T.
* Convolution (KFC):  a_{n,s} is the im2col patch at output position s,
  A = 1/N sum_{n,s} a a^T,  G = 1/(N S) sum_{n,s} g g^T.
* BatchNorm: per-example gradients of gamma and beta,
  ``g_gamma = sum_hw g * x_hat``, ``g_beta = sum_hw g``; the Fisher is their
  second moment, diagonal ('diag', the paper), 2x2 per channel ('unit') or the
  full 2C x 2C block ('full').

Damping (Tikhonov with pi-correction, as the paper; docs/SPEC.md, section 3):
``pi = sqrt((tr A / dim A) / (tr G / dim G))``,
``A_d = A + pi sqrt(gamma) I``, ``G_d = G + sqrt(gamma) / pi I``, and the
preconditioned gradient ``G_d^{-1} [dW | db] A_d^{-1}``; BN blocks use
``F + gamma I``.  Damping is applied to copies only: the running factors stay
undamped, so it never leaks into the average.

Each block class declares its layer type (``link_type``, ``function_types``), its statistics'
shapes and its inversion cost, and registers itself (:mod:`kfac_mn.fisher.registry`).  Only
a block writes its own fields: the optimizer hands it the global sums of a distributed step
(:meth:`FisherBlock.take_global_sums`), and state travels through :meth:`FisherBlock.serialize`.
"""
import math

from kfac_mn import backend
from kfac_mn.fisher.batched_inverse import InverseRequest
from kfac_mn.fisher.factor_products import gram
from kfac_mn.fisher.inverse import damped_inverse
from kfac_mn.fisher.registry import BlockOptions, register_block
from kfac_mn.functions import im2col
from kfac_mn.functions.batch_normalization import BatchNormalization as BatchNormFunction
from kfac_mn.functions.convolution_2d import Convolution2DFunction
from kfac_mn.functions.linear import LinearFunction
from kfac_mn.links import BatchNormalization, Convolution2D, Linear


def _host_values(xp, values):
    """Device scalars as Python floats, with one device-to-host copy for all of them."""
    return [float(v) for v in backend.to_cpu(xp.stack(values))]


def relative_change(new, old):
    """``||new - old||_F / ||old||_F`` (inf when there is no old value)."""
    if old is None:
        return math.inf
    xp = backend.get_array_module(new)
    norm_old, diff = _host_values(xp, [xp.linalg.norm(old.ravel()),
                                       xp.linalg.norm((new - old).ravel())])
    if norm_old == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm_old


def pi_correction(A, G):
    """pi = sqrt((tr A / dim A) / (tr G / dim G)); 1 when either trace vanishes."""
    xp = backend.get_array_module(A)
    trace_a, trace_g = _host_values(xp, [xp.trace(A), xp.trace(G).astype(A.dtype)])
    ta, tg = trace_a / A.shape[0], trace_g / G.shape[0]
    if not (ta > 0.0 and tg > 0.0 and math.isfinite(ta) and math.isfinite(tg)):
        return 1.0
    return math.sqrt(ta / tg)


def _cube(shape):
    """Operations to invert a d x d matrix (Cholesky d^3/3, then the inverse 2 d^3/3)."""
    return shape[0] ** 3


class FisherBlock:
    """Shared machinery: statistic sums for one step, running averages, state.

    A subclass declares its layer type (``link_type``, ``function_types``: see
    :mod:`kfac_mn.fisher.registry`), names its statistics in ``statistic_names``, says which
    are symmetric matrices (``symmetric``: communicated as upper triangles), and defines
    :meth:`statistic_shapes`, :meth:`inversion_cost`, ``param_list``, ``accumulate_forward``,
    ``accumulate_backward``, :meth:`inversion_requests` (or its own ``compute_inverses``)
    and ``precondition``.
    """

    link_type = None
    function_types = ()
    statistic_names = ()
    symmetric = {}

    def __init__(self, path, link, options=None):
        options = options or BlockOptions()
        self.path = path
        self.link = link
        self.options = options
        self.max_examples = options.max_examples  # statistics from a batch's first examples
        self.sums = {}        # name -> array: sums over examples, this step
        self.counts = {}      # name -> divisor of the sum (examples, or examples x positions)
        self.factors = {}     # name -> running (undamped) average
        self.inverses = {}    # name -> damped inverse from the last inversion

    def statistic_shapes(self):
        """{statistic name: shape}, from the layer's parameters alone (so every rank can lay
        out the communication buffers before any forward pass)."""
        raise NotImplementedError(f"{type(self).__name__} must define statistic_shapes")

    def inversion_cost(self):
        """Operations to invert this block's statistics (the owners' assignment balances
        them; the cost model divides them by the machine's inversion rate)."""
        raise NotImplementedError(f"{type(self).__name__} must define inversion_cost")

    def inversion_requests(self, damping):
        """The symmetric matrices this block inverts, as
        :class:`~kfac_mn.fisher.batched_inverse.InverseRequest` (name, matrix, damping,
        label); empty for a block that inverts in its own way (:meth:`compute_inverses`).
        The optimizer may invert the requests of many blocks together
        (:func:`~kfac_mn.fisher.batched_inverse.batched_damped_inverses`)."""
        return []

    def compute_inverses(self, damping, dtype, counter=None):
        """``inverses[name]`` for each of :meth:`inversion_requests`, one at a time."""
        for request in self.inversion_requests(damping):
            self.take_inverse(request.name, damped_inverse(
                request.matrix, request.damping, dtype, request.label, counter))

    def take_inverse(self, name, inverse):
        """The damped inverse of ``name`` (one of :meth:`inversion_requests`), computed here
        or by the optimizer together with other blocks'."""
        self.inverses[name] = inverse

    def _examples(self, n):
        """How many of a batch's ``n`` examples feed the statistics (all by default)."""
        return n if self.max_examples is None else min(n, self.max_examples)

    # -- statistics of one step ----------------------------------------------
    def reset_sums(self):
        self.sums = {}
        self.counts = {}

    def _accumulate(self, name, value, count):
        if name in self.sums:
            self.sums[name] += value
            self.counts[name] += count
        else:
            self.sums[name] = value
            self.counts[name] = count

    def has_statistics(self):
        return all(name in self.sums for name in self.statistic_names)

    def take_global_sums(self, sums, counts):
        """This step's statistics become ``sums`` (name -> sum over every rank's examples)
        with their global ``counts``; statistics with count 0 (no rank ran the layer) are
        dropped.  Used by distributed K-FAC's owner after the reduce-scatter."""
        self.reset_sums()
        for name, value in sums.items():
            if counts[name] > 0:
                self.sums[name] = value
                self.counts[name] = counts[name]

    def serialize(self, serializer):
        """Save or load the running factors and the inverses (``factor_<name>``,
        ``inverse_<name>``); a value absent on both sides stays absent."""
        xp = self.link.xp
        for kind, store in (("factor", self.factors), ("inverse", self.inverses)):
            for name in self.statistic_names:
                value = serializer(f"{kind}_{name}", store.get(name))
                if value is not None:
                    store[name] = xp.asarray(value)

    def averaged_statistics(self):
        """The statistics of this step: each sum divided by its count."""
        return {name: self.sums[name] / self.counts[name] for name in self.statistic_names}

    def update_factors(self, new, ema_decay):
        """F <- (1 - r) F + r F_new (F <- F_new the first time); returns the relative change.

        The relative change is the largest over this block's factors.
        """
        change = 0.0
        for name in self.statistic_names:
            old = self.factors.get(name)
            value = new[name]
            if old is None or ema_decay >= 1.0:
                updated = value.copy()  # never keep a view of a communication buffer
            else:
                updated = (1.0 - ema_decay) * old + ema_decay * value
                updated = updated.astype(old.dtype, copy=False)
            change = max(change, relative_change(updated, old))
            self.factors[name] = updated
        return change

    # -- gradients ---------------------------------------------------------
    def params(self):
        return [p for p in self.param_list() if p is not None]

    def gradients_ready(self):
        return all(p.grad is not None for p in self.params())


class KroneckerBlock(FisherBlock):
    """A linear or convolution layer: F ~ A kron G.

    ``factor_dtype`` is the precision of the inputs of the products a^T a and g^T g
    (:mod:`kfac_mn.fisher.factor_products`; None: the data's own).
    """

    statistic_names = ("A", "G")
    symmetric = {"A": True, "G": True}

    def __init__(self, path, link, options=None):
        super().__init__(path, link, options)
        self.factor_dtype = self.options.factor_dtype

    def statistic_shapes(self):
        """A is (in [+1 with a bias])^2 with in = W's values per output, G is out^2."""
        W = self.link.W.data
        inputs = W.size // W.shape[0] + (1 if self.has_bias else 0)
        return {"A": (inputs, inputs), "G": (W.shape[0], W.shape[0])}

    def inversion_cost(self):
        return sum(_cube(shape) for shape in self.statistic_shapes().values())

    def param_list(self):
        return [self.link.W, getattr(self.link, "b", None)]

    @property
    def has_bias(self):
        return getattr(self.link, "b", None) is not None

    @property
    def A(self):
        return self.factors.get("A")

    @property
    def G(self):
        return self.factors.get("G")

    def inversion_requests(self, damping):
        A, G = self.factors["A"], self.factors["G"]
        pi = pi_correction(A, G)
        root = math.sqrt(damping)
        return [InverseRequest("A", A, pi * root, f"{self.path}/A"),
                InverseRequest("G", G, root / pi, f"{self.path}/G")]

    def gradient_matrix(self):
        """[dW | db] as an (out x in[+1]) matrix, W flattened to out x in."""
        W = self.link.W
        xp = backend.get_array_module(W.grad)
        grad = W.grad.reshape(W.shape[0], -1)
        if self.has_bias:
            grad = xp.concatenate([grad, self.link.b.grad[:, None]], axis=1)
        return grad

    def precondition(self):
        """Replace W.grad (and b.grad) by G_d^{-1} [dW | db] A_d^{-1}."""
        W = self.link.W
        grad = self.gradient_matrix()
        inv_A, inv_G = self.inverses["A"], self.inverses["G"]
        natural = (inv_G @ grad.astype(inv_G.dtype, copy=False) @ inv_A).astype(W.grad.dtype)
        if self.has_bias:
            self.link.b.grad = natural[:, -1].copy()
            natural = natural[:, :-1]
        W.grad = natural.reshape(W.shape).copy()

    def _accumulate_A(self, patches, count):
        """patches: (M, K) rows of inputs (one per example, or per example and position)."""
        xp = backend.get_array_module(patches)
        K = patches.shape[1]
        if self.has_bias:
            A = xp.empty((K + 1, K + 1), dtype=patches.dtype)
            A[:K, :K] = gram(patches, self.factor_dtype)
            column = patches.sum(axis=0)
            A[:K, K] = column
            A[K, :K] = column
            A[K, K] = patches.shape[0]
        else:
            A = gram(patches, self.factor_dtype)
        self._accumulate("A", A, count)


class LinearBlock(KroneckerBlock):
    """y = W a + b with a of shape (N, in)."""

    link_type = Linear
    function_types = (LinearFunction,)

    def accumulate_forward(self, function, in_data):
        x = in_data[0]
        m = self._examples(x.shape[0])
        self._accumulate_A(x[:m].reshape(m, -1), m)

    def accumulate_backward(self, function, in_data, out_grad):
        gy = out_grad[0]
        n = gy.shape[0]
        m = self._examples(n)
        g = gy[:m] * n  # per-example gradients (the loss is a mean over all n)
        self._accumulate("G", gram(g, self.factor_dtype), m)


class ConvolutionBlock(KroneckerBlock):
    """KFC (Grosse & Martens 2016) on the im2col patches of the convolution itself."""

    link_type = Convolution2D
    function_types = (Convolution2DFunction,)

    def accumulate_forward(self, function, in_data):
        x, W = in_data[0], in_data[1]
        kh, kw = W.shape[2], W.shape[3]
        x = x[:self._examples(x.shape[0])]
        col = im2col(x, (kh, kw), function.stride, function.pad)
        n, c = x.shape[0], x.shape[1]
        xp = backend.get_array_module(x)
        # (N, C, kh, kw, OH, OW) -> one row per (example, position): (N*S, C*kh*kw)
        patches = xp.ascontiguousarray(
            col.reshape(n, c * kh * kw, -1).transpose(0, 2, 1)).reshape(-1, c * kh * kw)
        self._accumulate_A(patches, n)

    def accumulate_backward(self, function, in_data, out_grad):
        gy = out_grad[0]
        n, cout = gy.shape[0], gy.shape[1]
        m = self._examples(n)
        positions = gy.shape[2] * gy.shape[3]
        xp = backend.get_array_module(gy)
        rows = xp.ascontiguousarray(gy[:m].reshape(m, cout, positions).transpose(0, 2, 1))
        rows = rows.reshape(-1, cout)
        self._accumulate("G", gram(rows, self.factor_dtype) * (n * n), m * positions)


class BatchNormBlock(FisherBlock):
    """Fisher of (gamma, beta) from per-example gradients.

    ``kind`` is 'diag' (the paper: diagonal, 2C values), 'unit' (one 2x2 block
    per channel) or 'full' (2C x 2C, the authors' released code).  The layout of
    the parameter vector is [gamma; beta].
    """

    link_type = BatchNormalization
    function_types = (BatchNormFunction,)
    statistic_names = ("F",)

    def __init__(self, path, link, options=None):
        kind = (options or BlockOptions()).bn_fisher
        if kind not in ("diag", "unit", "full"):
            raise ValueError(f"bn_fisher must be 'diag', 'unit' or 'full', not {kind!r}")
        super().__init__(path, link, options)
        self.kind = kind
        self.symmetric = {"F": kind == "full"}

    def statistic_shapes(self):
        """F over C channels: (2C,) for 'diag', (C, 2, 2) for 'unit', (2C, 2C) for 'full'."""
        c = self.link.gamma.data.size
        return {"F": {"diag": (2 * c,), "unit": (c, 2, 2), "full": (2 * c, 2 * c)}[self.kind]}

    def inversion_cost(self):
        """1 per value of a diagonal F, 8 per 2x2 unit-wise block, d^3 for the full block."""
        c = self.link.gamma.data.size
        return {"diag": 2 * c, "unit": 8 * c, "full": (2 * c) ** 3}[self.kind]

    def param_list(self):
        return [self.link.gamma, self.link.beta]

    @property
    def F(self):
        return self.factors.get("F")

    def accumulate_forward(self, function, in_data):
        pass  # x_hat is read from the function node in backward

    def accumulate_backward(self, function, in_data, out_grad):
        gy = out_grad[0]
        n, c = gy.shape[0], gy.shape[1]
        m = self._examples(n)
        x_hat = function.x_hat[:m]
        g = gy[:m].reshape(m, c, -1)
        g_gamma = (g * x_hat.reshape(m, c, -1)).sum(axis=2) * n
        g_beta = g.sum(axis=2) * n
        xp = backend.get_array_module(gy)
        if self.kind == "diag":
            F = xp.concatenate([(g_gamma * g_gamma).sum(axis=0), (g_beta * g_beta).sum(axis=0)])
        elif self.kind == "unit":
            F = xp.empty((c, 2, 2), dtype=gy.dtype)
            F[:, 0, 0] = (g_gamma * g_gamma).sum(axis=0)
            F[:, 0, 1] = F[:, 1, 0] = (g_gamma * g_beta).sum(axis=0)
            F[:, 1, 1] = (g_beta * g_beta).sum(axis=0)
        else:
            both = xp.concatenate([g_gamma, g_beta], axis=1)
            F = both.T @ both
        self._accumulate("F", F, m)

    def compute_inverses(self, damping, dtype, counter=None):
        F = self.factors["F"]
        xp = backend.get_array_module(F)
        if self.kind == "diag":
            self.inverses["F"] = (1.0 / (F.astype(dtype) + damping)).astype(dtype)
        elif self.kind == "unit":
            a = F[:, 0, 0].astype(dtype) + damping
            b = F[:, 0, 1].astype(dtype)
            d = F[:, 1, 1].astype(dtype) + damping
            det = a * d - b * b  # > 0: F is PSD and damping > 0
            inverse = xp.empty(F.shape, dtype=dtype)
            inverse[:, 0, 0] = d / det
            inverse[:, 0, 1] = inverse[:, 1, 0] = -b / det
            inverse[:, 1, 1] = a / det
            if damping <= 0 or not bool(xp.isfinite(inverse).all()):
                for ch in range(F.shape[0]):
                    inverse[ch] = damped_inverse(F[ch], damping, dtype,
                                                 f"{self.path}/F[{ch}]", counter)
            self.inverses["F"] = inverse
        else:
            super().compute_inverses(damping, dtype, counter)

    def inversion_requests(self, damping):
        if self.kind != "full":  # 'diag' and 'unit' are inverted elementwise
            return []
        return [InverseRequest("F", self.factors["F"], damping, f"{self.path}/F")]

    def precondition(self):
        """Replace [dgamma; dbeta] by F_d^{-1} [dgamma; dbeta]."""
        gamma, beta = self.link.gamma, self.link.beta
        xp = backend.get_array_module(gamma.grad)
        c = gamma.shape[0]
        inverse = self.inverses["F"]
        if self.kind == "diag":
            new_gamma = gamma.grad * inverse[:c]
            new_beta = beta.grad * inverse[c:]
        elif self.kind == "unit":
            gg, gb = gamma.grad.astype(inverse.dtype), beta.grad.astype(inverse.dtype)
            new_gamma = inverse[:, 0, 0] * gg + inverse[:, 0, 1] * gb
            new_beta = inverse[:, 1, 0] * gg + inverse[:, 1, 1] * gb
        else:
            v = xp.concatenate([gamma.grad, beta.grad]).astype(inverse.dtype)
            w = inverse @ v
            new_gamma, new_beta = w[:c], w[c:]
        gamma.grad = new_gamma.astype(gamma.grad.dtype)
        beta.grad = new_beta.astype(beta.grad.dtype)


for _block_class in (LinearBlock, ConvolutionBlock, BatchNormBlock):
    register_block(_block_class)
