"""Batch norm synchronized across processes: the statistics are those of the whole batch.

An existing engine carries the bytes: an mpi4py communicator or a torch.distributed process
group (gloo, or MPI where torch was built with it). Each step exchanges per-channel float64
partials, so the merged statistics are exact and identical on every rank:

* forward: local ``(count, mean, M2)`` from the kernels -> one all-gather of
  ``2 + 2C`` float64 values per rank -> Chan's merge, the same on every rank -> normalize;
  the running statistics take the global mean and unbiased variance.
* backward: local ``(sum_dy, sum_dy_xmu)`` -> one all-reduce of ``1 + 2C`` float64 values
  -> the input gradient from the global sums.

Faults never hang on a check: the first exchange of a module compares channel counts and
dtypes across ranks, and every exchange carries a status word, so an input that fails its
checks on one rank raises there and a clear error on the others. A rank that dies or stops
calling makes the others fail inside the engine (gloo's timeout, or Open MPI aborting the
job), reported as such.

``batchnorm.torch.SyncBatchNorm`` (the ``torch.nn.SyncBatchNorm`` drop-in) shares this file's
exchange, merge and running-statistics rule.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple, overload

import numpy as np
import numpy.typing as npt

from . import _core  # type: ignore[attr-defined, unused-ignore]
from .functional import ArrayIn, FloatArray, _like, _reject_fusion, _returned
from ._norm_base import _NO_BACKWARD_IN_PLACE, _dtype_name, _to_numpy, _wrote_input
from .modules import IncompatibleKeys, _BatchNorm

__all__ = ["SyncBatchNorm"]

Moments = Tuple[float, FloatArray, FloatArray]  # (count, mean, M2), float64

_DTYPE_CODES = {np.dtype(np.float32): 32.0, np.dtype(np.float64): 64.0}
_FAILED = 0.0  # status word of a rank whose local part raised


# ---- transports: the engines that carry the bytes -----------------------------------------


class _Transport:
    """Collectives over float64 NumPy vectors; errors become one RuntimeError that says what."""

    name = ""
    rank = 0
    size = 1
    key: Any = None  # what a module remembers it compared its peers over

    def _allgather(self, send: FloatArray) -> FloatArray:
        raise NotImplementedError

    def _allreduce(self, buf: FloatArray) -> None:
        raise NotImplementedError

    def allgather(self, send: FloatArray, what: str) -> FloatArray:
        """(size, len(send)) array: row r is rank r's ``send``."""
        gathered: FloatArray = self._guarded(self._allgather, send, "all-gather", what)
        return gathered

    def allreduce(self, buf: FloatArray, what: str) -> None:
        """Sum ``buf`` over the ranks, in place."""
        self._guarded(self._allreduce, buf, "all-reduce", what)

    def _guarded(self, call: Callable[[FloatArray], Any], array: FloatArray, op: str, what: str) -> Any:
        try:
            return call(array)
        except Exception as error:  # the engine's own error: gloo, MPI, a closed socket
            raise RuntimeError(
                f"SyncBatchNorm: the {op} of {what} over {self.name} failed on rank {self.rank} "
                f"of {self.size}: another rank raised, exited or stopped calling in this step, "
                f"or the group timed out ({type(error).__name__}: {error})"
            ) from error


class _MPITransport(_Transport):
    def __init__(self, comm: Any) -> None:
        self.comm = self.key = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.name = f"MPI communicator {comm.Get_name() or type(comm).__name__}"

    def _allgather(self, send: FloatArray) -> FloatArray:
        recv = np.empty((self.size, send.size), np.float64)
        self.comm.Allgather(send, recv)
        return recv

    def _allreduce(self, buf: FloatArray) -> None:
        self.comm.Allreduce(sys.modules["mpi4py.MPI"].IN_PLACE, buf)


class _TorchTransport(_Transport):
    def __init__(self, group: Any) -> None:
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "SyncBatchNorm: the torch.distributed process group is not initialised "
                "(call torch.distributed.init_process_group first, and before "
                "destroy_process_group)"
            )
        self.torch, self.dist, self.group = torch, dist, group
        self.key = ("torch.distributed", group)
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        backend = dist.get_backend(group)
        self.name = f"torch.distributed ({backend}, {'default group' if group is None else 'process group'})"

    def _allgather(self, send: FloatArray) -> FloatArray:
        # gloo has no all_gather_into_tensor: a list of rows, stacked
        rows = [self.torch.empty(send.size, dtype=self.torch.float64) for _ in range(self.size)]
        self.dist.all_gather(rows, self.torch.from_numpy(send), group=self.group)
        gathered: FloatArray = self.torch.stack(rows).numpy()
        return gathered

    def _allreduce(self, buf: FloatArray) -> None:
        self.dist.all_reduce(self.torch.from_numpy(buf), group=self.group)


def _is_torch_group(comm: Any) -> bool:
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and isinstance(comm, dist.ProcessGroup)


def _is_mpi_comm(comm: Any) -> bool:
    mpi = sys.modules.get("mpi4py.MPI")
    return mpi is not None and isinstance(comm, mpi.Comm)


def _is_torch_non_member(comm: Any) -> bool:
    """torch.distributed's stand-in for a group on the ranks outside it (``new_group``
    returns it there): the counterpart of ``MPI.COMM_NULL``."""
    dist = sys.modules.get("torch.distributed")
    return (dist is not None and dist.is_available() and type(comm) is int
            and comm == getattr(getattr(dist, "GroupMember", None), "NON_GROUP_MEMBER", None))


def _check_comm(comm: Any) -> None:
    """TypeError for anything that is neither None, an mpi4py communicator nor a ProcessGroup."""
    if comm is not None and not (_is_mpi_comm(comm) or _is_torch_group(comm) or _is_torch_non_member(comm)):
        raise TypeError(
            "comm must be None, an mpi4py communicator or a torch.distributed ProcessGroup, "
            f"got {type(comm).__name__}"
        )


def transport(comm: Any) -> _Transport:
    """The engine for ``comm``; None: torch's default group when initialised, else
    ``MPI.COMM_WORLD`` (mpi4py is imported only then)."""
    if comm is None:
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            return _TorchTransport(None)
        try:
            from mpi4py import MPI
        except ImportError:
            raise RuntimeError(
                "SyncBatchNorm(comm=None) found no communicator: torch.distributed is not "
                "initialised and mpi4py is not installed; initialise a process group or pass comm="
            ) from None
        return _MPITransport(MPI.COMM_WORLD)
    if _is_mpi_comm(comm):
        if comm == sys.modules["mpi4py.MPI"].COMM_NULL:
            raise ValueError("comm is MPI.COMM_NULL: this process is not in the communicator")
        return _MPITransport(comm)
    _check_comm(comm)
    return torch_transport(comm, "comm")


def torch_transport(group: Any, name: str) -> _Transport:
    """The engine for a torch.distributed ``group`` (None: the default group); a ValueError
    naming the argument ``name`` on a rank outside the group."""
    if _is_torch_non_member(group):
        raise ValueError(f"{name} is torch.distributed's GroupMember.NON_GROUP_MEMBER (what new_group returns "
                         "outside the group): this process is not in the group")
    return _TorchTransport(group)


# ---- the exchanges ------------------------------------------------------------------------


def _same_dtype(link: _Transport, codes: FloatArray, what: str) -> None:
    """TypeError, the same on every rank, when the ranks' dtype codes (32.0, 64.0) differ."""
    if (codes != codes[0]).any():
        listing = ", ".join(f"rank {r}: float{int(c)}" for r, c in enumerate(codes))
        raise TypeError(f"SyncBatchNorm: {what} differs across the ranks of {link.name} ({listing})")


# Each communicator's token in this job, as (key, token): a number its ranks agreed on at this
# process's first check over it. A module remembers the token of its last check, pickled with
# it. Whether a module checks its peers must be the same on every rank (a rank that checks
# while another exchanges statistics garbles both exchanges), so it is decided by what every
# rank holds alike: the module's state and the job's token. Not by the module object: rank 0
# may keep its module while another rank loads a pickled copy of it (broadcast_object_list).
# A job that loads a module saved by another job has tokens of its own, so it checks again.
_TOKENS: List[Tuple[Any, float]] = []


def _token(key: Any) -> Optional[float]:
    """This job's token of the communicator ``key`` (a list, compared by ==: mpi4py
    communicators compare by handle but do not hash)."""
    return next((token for k, token in _TOKENS if k == key), None)


def peers_checked(link: _Transport, token: Optional[float]) -> bool:
    """Whether a module whose last peer check gave ``token`` need not check over ``link``."""
    return link.size == 1 or (token is not None and token == _token(link.key))


def token_to_restore(comm: Any) -> Optional[float]:
    """The token a module takes when ``load_state_dict`` gives it its state: this job's token
    of its communicator where the job's ranks have checked over it already, else None (it
    checks at its first step). A checkpoint is restored into a fresh module, on some ranks
    while the others keep the modules they trained (which checked) or on every rank; either
    way every rank then decides alike, as for a pickled copy. Looks the communicator up
    without starting one (``comm=None``: torch's default group if initialised, else
    ``MPI.COMM_WORLD`` if mpi4py's MPI is imported, as ``transport`` would pick)."""
    if comm is None:
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            return _token(("torch.distributed", None))
        mpi = sys.modules.get("mpi4py.MPI")
        return None if mpi is None else _token(mpi.COMM_WORLD)
    return _token(comm if _is_mpi_comm(comm) else ("torch.distributed", comm))


def check_peers(link: _Transport, channels: int, dtype: np.dtype[Any]) -> float:
    """Compare channel counts and dtypes across ranks (one all-gather of 3 values); raise
    the same error on every rank when they differ, before any per-channel exchange. Returns
    the communicator's token in this job (rank 0's: a fresh random number at the first check
    of the job's processes over it)."""
    token = _token(link.key)
    proposed = token if token is not None else float(int.from_bytes(os.urandom(6), "little") + 1)
    table = link.allgather(np.array([float(channels), _DTYPE_CODES[dtype], proposed]), "channel counts and dtypes")
    token = float(table[0, 2])
    _TOKENS[:] = [(k, t) for k, t in _TOKENS if k != link.key] + [(link.key, token)]
    counts, codes = table[:, 0].astype(np.int64), table[:, 1]
    if (counts != counts[0]).any():
        listing = ", ".join(f"rank {r}: {c}" for r, c in enumerate(counts))
        raise ValueError(
            f"SyncBatchNorm: num_features differs across the ranks of {link.name} ({listing}); "
            "every rank must run the same model"
        )
    _same_dtype(link, codes, "dtype")
    return token


def _peers_failed(link: _Transport, statuses: FloatArray, what: str) -> None:
    """Raise on a rank whose own part succeeded when another rank's did not."""
    failed = [r for r, s in enumerate(statuses) if s == _FAILED]
    if failed:
        raise RuntimeError(
            f"SyncBatchNorm: rank(s) {failed} of {link.name} raised in their {what} (see their "
            "error); this rank stopped too, with no state changed"
        )
    _same_dtype(link, statuses, "input dtype")


def merge(counts: FloatArray, means: FloatArray, m2s: FloatArray) -> Moments:
    """Chan's merge of per-rank partials (rows), pairwise as a tree, in float64.

    Every rank merges the same gathered table in the same order, so every rank gets the
    same bits. An empty partial (count 0, mean 0, M2 0) leaves the other side exact.
    """
    n, mean, m2 = counts[:, None], means, m2s
    while n.shape[0] > 1:
        rest = n.shape[0] // 2 * 2
        na, nb = n[0:rest:2], n[1:rest:2]
        total = na + nb
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(total > 0, nb / total, 0.0)
            a_share = np.where(total > 0, na / total, 0.0)
        delta = mean[1:rest:2] - mean[0:rest:2]
        # A weighted mean, not mean_a + delta * share: a rank whose mean is +inf (data holding
        # +inf) then gives +inf, as torch does, not inf - inf = NaN.
        merged_mean = mean[0:rest:2] * a_share + mean[1:rest:2] * share
        merged_m2 = m2[0:rest:2] + m2[1:rest:2] + delta * delta * (na * share)
        n = np.concatenate([total, n[rest:]])
        mean = np.concatenate([merged_mean, mean[rest:]])
        m2 = np.concatenate([merged_m2, m2[rest:]])
    return float(n[0, 0]), mean[0], m2[0]


def _local_moments(x: ArrayIn, axis: int, empty: bool, channels: int) -> Moments:
    if empty:  # no values: the neutral partial of the merge
        return 0.0, np.zeros(channels), np.zeros(channels)
    count, mean, m2 = _core.batch_moments(x, axis)
    return float(count), mean, m2


def global_moments(
    link: _Transport, channels: int, local: Callable[[], Tuple[Moments, float]]
) -> Moments:
    """Run ``local()`` -> ((count, mean, M2), dtype code) on this rank, all-gather, merge.

    ``local`` holds every local check: if it raises, this rank still takes part in the
    exchange (with a failed status) and re-raises after it, so the others raise too.
    """
    error: Optional[Exception] = None
    send = np.zeros(2 + 2 * channels)
    try:
        (count, mean, m2), code = local()
        send[0], send[1], send[2 : 2 + channels], send[2 + channels :] = code, count, mean, m2
    except Exception as caught:  # re-raised below, after the others heard of it
        error, send[:] = caught, 0.0
    table = link.allgather(send, "batch statistics")
    if error is not None:
        raise error
    _peers_failed(link, table[:, 0], "forward")
    return merge(table[:, 1], table[:, 2 : 2 + channels], table[:, 2 + channels :])


def global_grad_sums(
    link: _Transport, channels: int, local: Callable[[], Tuple[FloatArray, FloatArray]]
) -> Tuple[Tuple[FloatArray, FloatArray], Tuple[FloatArray, FloatArray]]:
    """Run ``local()`` -> (sum_dy, sum_dy_xmu) on this rank; all-reduce them (one call).

    Returns (local sums, global sums). A failed ``local`` is reported as in ``global_moments``.
    """
    error: Optional[Exception] = None
    buf = np.zeros(1 + 2 * channels)
    mine: Tuple[FloatArray, FloatArray] = (buf[1:1 + channels], buf[1 + channels:])
    try:
        mine = local()
        buf[1 : 1 + channels], buf[1 + channels :] = mine
    except Exception as caught:
        error, buf[0] = caught, 1.0
    link.allreduce(buf, "gradient sums")
    if error is not None:
        raise error
    if buf[0] > 0:
        raise RuntimeError(
            f"SyncBatchNorm: {int(buf[0])} rank(s) of {link.name} raised in their backward (see "
            "their error); this rank stopped too"
        )
    return mine, (buf[1 : 1 + channels], buf[1 + channels :])


def check_count(count: float, link: _Transport) -> None:
    """torch's one-value-per-channel error, for the global batch (same on every rank)."""
    if count == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got input size 1 "
            f"over all {link.size} ranks"
        )


def check_out(out: Any, like: ArrayIn, apart: Dict[str, Optional[FloatArray]]) -> None:
    """The kernels' checks of ``out`` (an array of ``like``'s dtype and shape, writable, its
    elements at separate addresses, no tensor that requires grad, sharing no memory with the
    per-channel arrays in ``apart``), in their words, made in a step's local part: a bad ``out``
    on one rank then fails the step on every rank before any rank changes state (the kernels,
    which check again, run after the exchange)."""
    if out is None:
        return
    if getattr(out, "requires_grad", False):
        raise TypeError("out is a tensor that requires grad; batchnorm's NumPy API would cut its autograd "
                        "graph: pass tensor.detach(), or use batchnorm.torch for autograd")
    if not (isinstance(out, np.ndarray) or hasattr(out, "__dlpack__")):
        raise TypeError(f"out must be a NumPy array or a CPU tensor supporting DLPack, got {type(out).__name__}")
    array, reference = _to_numpy(out, "out"), _to_numpy(like)
    if array.dtype != reference.dtype:
        raise TypeError(f"out has dtype {array.dtype} but the input has dtype {reference.dtype}: pass arrays of "
                        "one dtype (batchnorm never casts silently)")
    if array.shape != reference.shape:
        raise ValueError(f"out must have the input's shape {reference.shape}, got {array.shape}")
    if not array.flags.writeable:
        raise ValueError("out is read-only; pass a writable array")
    if array.size > 1:
        for dim, (size, stride) in enumerate(zip(array.shape, array.strides)):
            if stride == 0 and size > 1:
                raise ValueError(f"out has more than one element at one memory location (a zero stride in "
                                 f"dimension {dim}); pass an array whose elements are separate")
    for name, other in apart.items():
        if other is not None and np.may_share_memory(array, other):
            raise ValueError(f"out overlaps {name}; pass a separate array")


def _empty_like(x: ArrayIn) -> FloatArray:
    """A new zero-size NumPy array with the shape and dtype of ``x``."""
    return np.empty_like(_to_numpy(x))


def invstd_of(count: float, m2: FloatArray, eps: float) -> FloatArray:
    """1/sqrt(biased variance + eps), float64 (1/sqrt(eps) for an empty whole batch)."""
    return 1.0 / np.sqrt(m2 / max(count, 1.0) + eps)  # type: ignore[no-any-return]


class KernelStats(NamedTuple):
    """The merged statistics as the phase kernels take them (in the input's dtype).

    ``mean`` is the float64 mean rounded to the dtype, and ``shift = mean - exact mean``
    (float64). The kernels normalize ``x - mean`` exactly; the callers move ``shift`` into
    the bias (forward) and the sums (backward), as the fused kernels move it into beta, so
    no digit is lost at a large mean.
    """

    mean: FloatArray
    invstd: FloatArray
    shift: FloatArray


def kernel_stats(mean: FloatArray, invstd: FloatArray, dtype: np.dtype[Any]) -> KernelStats:
    rounded = mean.astype(dtype)
    return KernelStats(rounded, invstd.astype(dtype), rounded.astype(np.float64) - mean)


def shifted_bias(stats: KernelStats, weight: Optional[FloatArray], bias: Optional[FloatArray]) -> FloatArray:
    """The bias that makes ``(x - stats.mean)*invstd*weight + bias'`` the exact normalization."""
    scale = stats.invstd.astype(np.float64) * (1.0 if weight is None else weight.astype(np.float64))
    beta = (0.0 if bias is None else bias.astype(np.float64)) + stats.shift * scale
    return beta.astype(stats.mean.dtype)


def exact_sums(stats: KernelStats, sum_dy: FloatArray, sum_dy_xmu: FloatArray) -> Tuple[FloatArray, FloatArray]:
    """Local (sum_dy, sum(dy*(x - exact mean))) from the kernels' sums about ``stats.mean``."""
    return sum_dy, sum_dy_xmu + stats.shift * sum_dy


def shifted_sum_dy(stats: KernelStats, sum_dy: FloatArray, sum_dy_xmu: FloatArray) -> FloatArray:
    """The sum_dy to give the backward apply (which centres x on ``stats.mean``) so that its
    input gradient is that of the exact mean."""
    invstd = stats.invstd.astype(np.float64)
    return sum_dy + stats.shift * invstd * invstd * sum_dy_xmu


def update_running(
    running_mean: Optional[npt.NDArray[Any]],
    running_var: Optional[npt.NDArray[Any]],
    count: float,
    mean: FloatArray,
    m2: FloatArray,
    factor: float,
) -> None:
    """torch's running-statistics rule with the global mean and unbiased variance, in place;
    float64 arithmetic, rounded once into the buffers' dtype (the same on every rank)."""
    if running_mean is not None:
        running_mean[...] = (1.0 - factor) * running_mean + factor * mean
    if running_var is not None:
        running_var[...] = (1.0 - factor) * running_var + factor * (m2 / (count - 1.0))


def backward_sums(grad_y: ArrayIn, x: ArrayIn, stats: KernelStats, axis: int, empty: bool) -> Tuple[FloatArray, FloatArray]:
    """Local (sum_dy, sum_dy_xmu) about the exact mean, float64 (zeros for an empty local batch)."""
    if empty:
        return np.zeros(stats.mean.size), np.zeros(stats.mean.size)
    sum_dy, sum_dy_xmu = _core.batch_norm_backward_reduce(grad_y, x, stats.mean, axis)
    return exact_sums(stats, sum_dy, sum_dy_xmu)


# ---- the NumPy module ---------------------------------------------------------------------


class SyncBatchNorm(_BatchNorm):
    """Batch norm whose training statistics span every rank of ``comm``.

    Same parameters, state, ``state_dict``, ``train``/``eval`` and ``backward`` as
    ``BatchNorm2d``, for (N, C, ...) inputs of any rank >= 2 (channels on ``axis``,
    ``-1`` for channels-last). In eval mode, and on a communicator of one process, it is
    plain batch norm. In training, every rank of ``comm`` must call it on its local part
    of the batch (any size, also empty) in the same step; the output, the running
    statistics and ``num_batches_tracked`` are those of one process running the whole
    batch, identical on every rank.

    Parameters
    ----------
    num_features, eps, momentum, affine, track_running_stats, bias, dtype, axis, device
        As for ``BatchNorm1d``.
    comm : mpi4py communicator, torch.distributed ProcessGroup or None
        None: torch's default process group when torch.distributed is initialised, else
        ``MPI.COMM_WORLD`` (decided at each training forward).

    Notes
    -----
    ``backward`` gives the gradient of the whole batch's loss: ``grad_x`` for this rank's
    part, and ``weight_grad``/``bias_grad`` summed over all ranks (the same on every rank;
    no further averaging is needed). ``num_batches_tracked`` counts a step unless the whole
    batch is empty. Errors in a training step (bad input on one rank, mismatched channel
    counts or dtypes) are raised on every rank.
    """

    _ranks = (2, 3, 4, 5)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        comm: Any = None,
        bias: bool = True,
        dtype: npt.DTypeLike = np.float32,
        axis: int = 1,
        device: Any = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, bias=bias, dtype=dtype, axis=axis,
                         device=device)
        _check_comm(comm)
        self.comm = comm
        self._checked: Optional[float] = None  # the token of the last peer check (check_peers)

    def _link(self) -> _Transport:
        link = transport(self.comm)
        if not peers_checked(link, self._checked):
            self._checked = check_peers(link, self.num_features, self.dtype)
        return link

    @overload
    def __call__(
        self,
        x: npt.NDArray[Any],
        out: Optional[npt.NDArray[Any]] = ...,
        *,
        residual: Optional[ArrayIn] = ...,
        activation: Optional[str] = ...,
    ) -> FloatArray: ...
    @overload
    def __call__(
        self,
        x: ArrayIn,
        out: Optional[ArrayIn] = ...,
        *,
        residual: Optional[ArrayIn] = ...,
        activation: Optional[str] = ...,
    ) -> Any: ...
    def __call__(
        self,
        x: ArrayIn,
        out: Optional[ArrayIn] = None,
        *,
        residual: Optional[ArrayIn] = None,
        activation: Optional[str] = None,
    ) -> Any:
        """Normalize ``x`` with the statistics of the whole batch (training) or the running
        statistics (eval); arguments and result as ``BatchNorm2d.__call__``."""
        if not self.training:  # eval: running statistics, or this rank's own batch (torch's rule)
            return super().__call__(x, out, residual=residual, activation=activation)
        link = self._link()
        if link.size == 1:
            return super().__call__(x, out, residual=residual, activation=activation)
        axis, channels = self.axis, self.num_features
        empty = [False]

        def local() -> Tuple[Moments, float]:
            if residual is not None or activation is not None:
                _reject_fusion(residual, activation)
            empty[0] = self._check_input(x)
            if _dtype_name(x) != self.dtype.name:
                raise TypeError(f"x must have dtype {self.dtype} (the module's), got {_dtype_name(x)}")
            check_out(out, x, {"weight": self.weight, "bias": self.bias, "running_mean": self.running_mean,
                               "running_var": self.running_var})
            return _local_moments(x, axis, empty[0], channels), _DTYPE_CODES[self.dtype]

        count, mean, m2 = global_moments(link, channels, local)
        check_count(count, link)
        invstd = invstd_of(count, m2, self.eps)
        stats = kernel_stats(mean, invstd, self.dtype)
        y: Any
        if empty[0]:  # nothing to normalize here (the whole batch may be empty too)
            y = _empty_like(x) if out is None else out
        else:
            bias = shifted_bias(stats, self.weight, self.bias)
            y = _core.batch_norm_apply(x, stats.mean, stats.invstd, self.weight, bias, axis, out)
        # an empty whole batch carries no statistics: no state changes (as BatchNorm2d)
        if self.training and self.track_running_stats and count > 0:
            counter = self.num_batches_tracked
            update_running(self.running_mean, self.running_var, count, mean, m2, self._momentum_factor(counter))
            if counter is not None:
                counter[()] += 1
        self._sync_saved = (link, x, stats, invstd, self.weight, count, out, empty[0])
        self._saved = None
        return _returned(x, out, y)

    forward = __call__

    @overload
    def backward(self, grad_y: npt.NDArray[Any], out: Optional[npt.NDArray[Any]] = ...) -> FloatArray: ...
    @overload
    def backward(self, grad_y: ArrayIn, out: Optional[ArrayIn] = ...) -> Any: ...
    def backward(self, grad_y: ArrayIn, out: Optional[ArrayIn] = None) -> Any:
        """Gradient of the last forward: ``grad_x`` for this rank's part; ``weight_grad`` and
        ``bias_grad`` of the whole batch (summed over ranks). After an eval or one-process
        forward it is ``BatchNorm2d.backward``. Every rank must call it in the same step."""
        if self._saved is not None or self.__dict__.get("_sync_saved") is None:
            return super().backward(grad_y, out)
        link, x, stats, invstd64, weight, count, saved_out, empty = self._sync_saved
        axis = self.axis
        if count == 0:  # every rank knows: no exchange, nothing to differentiate
            self.weight_grad = None if weight is None else np.zeros_like(weight)
            self.bias_grad = None if self.bias is None else np.zeros_like(self.bias)
            return _like(grad_y, _empty_like(grad_y)) if out is None else out

        def local() -> Tuple[FloatArray, FloatArray]:
            if saved_out is not None and _wrote_input(saved_out, x):
                raise RuntimeError(_NO_BACKWARD_IN_PLACE)
            if _to_numpy(grad_y).shape != _to_numpy(x).shape:
                raise ValueError(
                    f"grad_y must have the shape of the forward's input {_to_numpy(x).shape}, "
                    f"got {_to_numpy(grad_y).shape}"
                )
            check_out(out, grad_y, {"weight": weight})
            return backward_sums(grad_y, x, stats, axis, empty)

        _, (sum_dy, sum_dy_xmu) = global_grad_sums(link, self.num_features, local)
        grad_x: Any
        if empty:
            grad_x = _empty_like(grad_y) if out is None else out
        else:
            grad_x = _core.batch_norm_backward_apply(
                grad_y, x, stats.mean, stats.invstd, weight, shifted_sum_dy(stats, sum_dy, sum_dy_xmu),
                sum_dy_xmu, count, axis, out,
            )
        self.weight_grad = None if weight is None else (sum_dy_xmu * invstd64).astype(self.dtype)
        self.bias_grad = None if self.bias is None else sum_dy.astype(self.dtype)
        return _returned(grad_y, out, grad_x)

    def __getstate__(self) -> Any:
        state = super().__getstate__()
        state["_sync_saved"] = None
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> IncompatibleKeys:
        """``BatchNorm``'s; the module then checks its peers as one that trained in this job
        does (``token_to_restore``): a rank that restores a checkpoint while the others keep
        their modules takes part in the same exchanges."""
        result = super().load_state_dict(state_dict, strict)
        self._checked = token_to_restore(self.comm)
        return result

    def extra_repr(self) -> str:
        """BatchNorm's, plus the communicator when one was given."""
        text = super().extra_repr()
        return text if self.comm is None else f"{text}, comm={type(self.comm).__name__}"
