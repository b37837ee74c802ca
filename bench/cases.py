"""Benchmark cases: a logical (N, C, ...) shape, a memory layout and a dtype.

A case owns no timing logic; it knows how its tensor sits in memory, which axis holds
the channels, and how to make the arrays that every implementation shares.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

# Logical shapes, channels at index 1 (PyTorch order). Chosen to cover ResNet-like
# activations (large, mid, small spatial), a batch-1 inference case, a tiny case where
# call overhead dominates, (N, C) inputs of BatchNorm1d, and a 3-D volume.
DEFAULT_SHAPES: tuple[tuple[int, ...], ...] = (
    (32, 64, 56, 56),
    (32, 256, 14, 14),
    (8, 512, 7, 7),
    (1, 64, 112, 112),
    (1, 64, 7, 7),
    (256, 1024),
    (4096, 64),
    (2, 32, 8, 32, 32),
)

CHANNELS_FIRST = "NCHW"
CHANNELS_LAST = "NHWC"
# (N, C) has one memory order only; it runs the channels-last kernel family (inner == 1).
FLAT = "NC"


class _Sized:
    """What every case says of its array: ``label``, ``numel`` and ``nbytes`` from the
    ``shape`` and ``dtype`` fields of the dataclass."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def label(self) -> str:
        return "x".join(map(str, self.shape))

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.numel * numpy_dtype(self.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class Case(_Sized):
    shape: tuple[int, ...]  # logical, channels at index 1
    layout: str  # CHANNELS_FIRST, CHANNELS_LAST or FLAT
    dtype: str  # "float32" | "float64" | "float16" | "bfloat16"

    @property
    def channels(self) -> int:
        return self.shape[1]

    @property
    def memory_shape(self) -> tuple[int, ...]:
        """Shape of the NumPy array as stored: channels moved last for channels-last."""
        if self.layout == CHANNELS_LAST:
            return (self.shape[0], *self.shape[2:], self.shape[1])
        return self.shape

    @property
    def axis(self) -> int:
        """Channel axis of the NumPy array (the `axis=` argument of batchnorm)."""
        return -1 if self.layout == CHANNELS_LAST else 1

    @property
    def reduce_axes(self) -> tuple[int, ...]:
        rank = len(self.shape)
        channel_axis = self.axis % rank
        return tuple(a for a in range(rank) if a != channel_axis)

    @property
    def channel_view_shape(self) -> tuple[int, ...]:
        """Shape that broadcasts a (C,) vector along the channel axis of the array."""
        view = [1] * len(self.shape)
        view[self.axis] = self.channels
        return tuple(view)

    @property
    def channels_first_family(self) -> bool:
        """True when the kernel sees a large `inner` (DESIGN.md: one view every kernel sees)."""
        return self.layout == CHANNELS_FIRST and len(self.shape) > 2

    @property
    def channel_block_bytes(self) -> int:
        """Bytes of one channel: what a channels-first train pass keeps in L2."""
        return self.nbytes // self.channels

    def to_torch(self, array: np.ndarray):
        """Zero-copy torch view in logical (N, C, ...) order; channels_last strides for NHWC."""
        tensor = torch_view(array)
        if self.layout == CHANNELS_LAST:
            rank = array.ndim
            tensor = tensor.permute(0, rank - 1, *range(1, rank - 1))
        return tensor

    def from_torch(self, tensor) -> np.ndarray:
        """NumPy array in this case's memory shape, for comparing against the reference."""
        if self.layout == CHANNELS_LAST:
            rank = tensor.dim()
            tensor = tensor.permute(0, *range(2, rank), 1)
        return torch_to_numpy(tensor)


@dataclasses.dataclass
class Arrays:
    """Every buffer of one case, shared by all implementations (same memory, same bytes)."""

    x: np.ndarray
    grad_y: np.ndarray
    residual: np.ndarray
    out: np.ndarray  # preallocated output (`out=` / ufunc out= / ORT bound output)
    running_mean: np.ndarray
    running_var: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    save_mean: np.ndarray  # batch statistics of x, as a training forward saves them
    save_invstd: np.ndarray
    initial_running_mean: np.ndarray
    initial_running_var: np.ndarray

    def fresh_running_stats(self) -> None:
        """Undo the in-place running-stat updates of training forwards between operations."""
        self.running_mean[...] = self.initial_running_mean
        self.running_var[...] = self.initial_running_var


EPS = 1e-5
MOMENTUM = 0.1
HALF_DTYPES = ("float16", "bfloat16")


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a case's data: bfloat16 is ml_dtypes' (imported only for it)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def param_dtype(name: str) -> np.dtype:
    """Per-channel arrays (weight, bias, statistics): float32 for half data, as in PyTorch."""
    return np.dtype(np.float32) if name in HALF_DTYPES else np.dtype(name)


def torch_view(array: np.ndarray):
    """Zero-copy torch tensor of a NumPy array, an ml_dtypes bfloat16 one included."""
    import torch

    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def torch_to_numpy(tensor) -> np.ndarray:
    """A torch result as NumPy, for comparing with the reference (bfloat16 through float32)."""
    import torch

    tensor = tensor.detach()
    return tensor.float().numpy() if tensor.dtype is torch.bfloat16 else tensor.numpy()


def make_arrays(case: Case, seed: int = 0) -> Arrays:
    rng = np.random.default_rng(seed)
    dtype, vector_dtype = numpy_dtype(case.dtype), param_dtype(case.dtype)
    channels = case.channels

    def tensor(loc: float, scale: float) -> np.ndarray:
        return rng.normal(loc, scale, size=case.memory_shape).astype(dtype)

    def vector(low: float, high: float) -> np.ndarray:
        return rng.uniform(low, high, size=channels).astype(vector_dtype)

    x = tensor(0.5, 2.0)
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=case.reduce_axes)
    var = x64.var(axis=case.reduce_axes)
    running_mean = vector(-0.5, 0.5)
    running_var = vector(0.5, 2.0)
    return Arrays(
        x=x,
        grad_y=tensor(0.0, 1.0),
        residual=tensor(0.0, 1.0),
        out=np.zeros_like(x),
        running_mean=running_mean,
        running_var=running_var,
        weight=vector(0.5, 1.5),
        bias=vector(-0.5, 0.5),
        save_mean=mean.astype(vector_dtype),
        save_invstd=(1.0 / np.sqrt(var + EPS)).astype(vector_dtype),
        initial_running_mean=running_mean.copy(),
        initial_running_var=running_var.copy(),
    )


def iter_cases(shapes, dtype: str) -> Iterator[Case]:
    for shape in shapes:
        if len(shape) == 2:
            yield Case(tuple(shape), FLAT, dtype)
        else:
            yield Case(tuple(shape), CHANNELS_FIRST, dtype)
            yield Case(tuple(shape), CHANNELS_LAST, dtype)


def parse_shape(text: str) -> tuple[int, ...]:
    """'32,64,56,56' or '32x64x56x56' -> (32, 64, 56, 56)."""
    parts = text.replace("x", ",").split(",")
    shape = tuple(int(p) for p in parts if p.strip())
    if len(shape) < 2:
        raise ValueError(f"shape needs at least (N, C), got {text!r}")
    return shape


# ---------------------------------------------------------------- the other norms (--family norms)

NORM_TITLES = {"layer": "LayerNorm", "rms": "RMSNorm", "group": "GroupNorm", "instance": "InstanceNorm"}


@dataclasses.dataclass(frozen=True)
class NormCase(_Sized):
    """One LayerNorm / RMSNorm / GroupNorm / InstanceNorm call on channels-first memory.

    Each norm sees ``x`` as (rows, cols): one row per group of values that share a mean and
    a variance (a token for LayerNorm/RMSNorm over the last dim, a (sample, group) for
    GroupNorm, a (sample, channel) for InstanceNorm)."""

    norm: str  # a key of NORM_TITLES
    shape: tuple[int, ...]
    dtype: str
    groups: int = 0  # GroupNorm only

    @property
    def layout(self) -> str:
        """The report's second column: which norm (all cases are channels-first)."""
        title = NORM_TITLES[self.norm]
        return f"{title} g={self.groups}" if self.norm == "group" else title

    @property
    def rows(self) -> int:
        if self.norm in ("layer", "rms"):
            return self.numel // self.shape[-1]
        return self.shape[0] * (self.groups if self.norm == "group" else self.shape[1])

    @property
    def group_bytes(self) -> int:
        """Bytes of one row (what a one-pass kernel keeps in L2 between its two reads)."""
        return self.nbytes // self.rows

    @property
    def param_shape(self) -> tuple[int, ...]:
        """Shape of weight/bias as they broadcast against x."""
        if self.norm in ("layer", "rms"):
            return (self.shape[-1],)
        return (self.shape[1],) + (1,) * (len(self.shape) - 2)


# The shapes: a transformer token and a batch of sequences, a LLaMA-size RMSNorm
# token, a diffusion U-Net GroupNorm, a style-transfer InstanceNorm.
NORM_CASES: tuple[tuple[str, tuple[int, ...], int], ...] = (
    ("layer", (1, 768), 0),
    ("layer", (32, 128, 768), 0),
    ("rms", (1, 4096), 0),
    ("group", (8, 320, 64, 64), 32),
    ("instance", (8, 64, 128, 128), 0),
)


@dataclasses.dataclass
class NormArrays:
    """Every buffer of one norm case, shared by all implementations. x, grad_y and out are of
    the case's dtype; the others float32 for half data (as torch's and batchnorm's half norms
    take and save them), else of the case's dtype."""

    x: np.ndarray
    grad_y: np.ndarray
    out: np.ndarray
    weight: np.ndarray  # flat: (D,) for LayerNorm/RMSNorm, (C,) for GroupNorm/InstanceNorm
    bias: np.ndarray
    save_mean: np.ndarray  # (rows,) float64-accurate statistics of x, as a forward saves them
    save_invstd: np.ndarray

    def fresh_running_stats(self) -> None:
        """No running statistics here (the runner calls this for every case)."""


def make_norm_arrays(case: NormCase, seed: int = 0) -> NormArrays:
    rng = np.random.default_rng(seed)
    dtype, vector_dtype = numpy_dtype(case.dtype), param_dtype(case.dtype)
    x = rng.normal(0.5, 2.0, size=case.shape).astype(dtype)
    rows = x.astype(np.float64).reshape(case.rows, -1)
    mean = rows.mean(axis=1)
    second = (rows**2).mean(axis=1) if case.norm == "rms" else rows.var(axis=1)
    params = int(np.prod(case.param_shape))
    return NormArrays(
        x=x,
        grad_y=rng.normal(0.0, 1.0, size=case.shape).astype(dtype),
        out=np.zeros_like(x),
        weight=rng.uniform(0.5, 1.5, size=params).astype(vector_dtype),
        bias=rng.uniform(-0.5, 0.5, size=params).astype(vector_dtype),
        save_mean=mean.astype(vector_dtype),
        save_invstd=(1.0 / np.sqrt(second + EPS)).astype(vector_dtype),
    )


def iter_norm_cases(dtype: str) -> Iterator[NormCase]:
    for norm, shape, groups in NORM_CASES:
        yield NormCase(norm, shape, dtype, groups)
