"""Independent float64 NumPy reference for batch normalization.

Everything here is written from the formulas in DESIGN.md (and PyTorch's documented
semantics), in plain float64 NumPy, with no code shared with the library.  The
statistics use a corrected two-pass algorithm (mean, then a correction pass over the
centred data) so that the reference itself is accurate to a few float64 ulps even for
data with a large mean (offset 1e6): this is what the accuracy tests compare against.

Conventions: ``axis`` is the channel axis of ``x`` (negative counts from the end);
per-channel arrays have shape ``(C,)``.  All results are float64 NumPy arrays.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "norm_axis",
    "per_channel",
    "bshape",
    "stats",
    "forward_train",
    "forward_eval",
    "backward_train",
    "backward_eval",
    "fused_eval",
    "fold",
    "linear",
    "conv2d",
    "conv_transpose2d_1x1",
    "RefBatchNorm",
    "moments",
    "layer_norm",
    "rms_norm",
    "layer_norm_backward",
    "rms_norm_backward",
    "group_norm",
    "group_norm_backward",
    "instance_norm",
    "instance_norm_backward",
]


def norm_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for rank {ndim}")
    return axis % ndim


def per_channel(x, axis: int = 1) -> np.ndarray:
    """View x (any layout) as float64 (rows, C): one column per channel."""
    x = np.asarray(x, dtype=np.float64)
    ax = norm_axis(axis, x.ndim)
    c = x.shape[ax]
    return np.moveaxis(x, ax, -1).reshape(-1, c)


def bshape(v, ndim: int, axis: int) -> np.ndarray:
    """Reshape a (C,) vector so it broadcasts along the channel axis of a rank-ndim array."""
    ax = norm_axis(axis, ndim)
    shape = [1] * ndim
    shape[ax] = -1
    return np.asarray(v, dtype=np.float64).reshape(shape)


def stats(x, axis: int = 1):
    """Per-channel mean and *biased* variance (float64), corrected two-pass."""
    return moments(per_channel(x, axis))


def moments(p):
    """Mean and *biased* variance of each column of a float64 (rows, cols) array,
    corrected two-pass."""
    p = np.asarray(p, dtype=np.float64)
    n = p.shape[0]
    if n == 0:
        nan = np.full(p.shape[1], np.nan)
        return nan, nan.copy()
    m0 = p.sum(axis=0) / n
    d = p - m0
    # correction pass: m = m0 + mean(x - m0)  (x - m0 is exact when x ~ m0)
    corr = d.sum(axis=0) / n
    mean = m0 + corr
    d = p - mean
    var = (d * d).sum(axis=0) / n
    # compensate for the residual of the mean (Chan/Björck correction), clamp at 0
    var = var - (d.sum(axis=0) / n) ** 2
    return mean, np.maximum(var, 0.0)


def _wb(weight, bias, c):
    w = np.ones(c) if weight is None else np.asarray(weight, dtype=np.float64)
    b = np.zeros(c) if bias is None else np.asarray(bias, dtype=np.float64)
    return w, b


def _normalize(x, mean, var, weight, bias, eps, axis):
    x64 = np.asarray(x, dtype=np.float64)
    c = x64.shape[norm_axis(axis, x64.ndim)]
    w, b = _wb(weight, bias, c)
    invstd = 1.0 / np.sqrt(np.asarray(var, dtype=np.float64) + eps)
    nd = x64.ndim
    y = (x64 - bshape(mean, nd, axis)) * bshape(invstd * w, nd, axis) + bshape(b, nd, axis)
    return y, invstd


def forward_train(x, weight=None, bias=None, running_mean=None, running_var=None,
                  momentum=0.1, eps=1e-5, axis: int = 1):
    """Training forward.

    Returns ``(y, mean, invstd, new_running_mean, new_running_var)``; the running stats
    are ``None`` when not given.  ``momentum`` must be a float here (callers turn
    momentum=None into 1/num_batches_tracked).  The running variance uses the unbiased
    batch variance ``var * n / (n - 1)``.
    """
    x64 = np.asarray(x, dtype=np.float64)
    mean, var = stats(x64, axis)
    n = per_channel(x64, axis).shape[0]
    y, invstd = _normalize(x64, mean, var, weight, bias, eps, axis)
    new_rm = new_rv = None
    if running_mean is not None:
        rm = np.asarray(running_mean, dtype=np.float64)
        rv = np.asarray(running_var, dtype=np.float64)
        unbiased = var * n / (n - 1)
        new_rm = (1.0 - momentum) * rm + momentum * mean
        new_rv = (1.0 - momentum) * rv + momentum * unbiased
    return y, mean, invstd, new_rm, new_rv


def forward_eval(x, mean, var, weight=None, bias=None, eps=1e-5, axis: int = 1):
    y, _ = _normalize(x, mean, var, weight, bias, eps, axis)
    return y


def fused_eval(x, mean, var, weight=None, bias=None, eps=1e-5, axis: int = 1,
               residual=None, activation=None):
    """act(bn_eval(x) + residual), act in {None, "relu"}."""
    y = forward_eval(x, mean, var, weight, bias, eps, axis)
    if residual is not None:
        y = y + np.asarray(residual, dtype=np.float64)
    if activation == "relu":
        y = np.maximum(y, 0.0)
    elif activation is not None:
        raise ValueError(activation)
    return y


def backward_train(grad_y, x, mean, invstd, weight=None, axis: int = 1):
    """Gradient through the batch statistics (DESIGN.md formulas).

    Returns ``(grad_x, grad_weight, grad_bias)``.
    """
    x64 = np.asarray(x, dtype=np.float64)
    gy = np.asarray(grad_y, dtype=np.float64)
    nd = x64.ndim
    c = x64.shape[norm_axis(axis, nd)]
    w, _ = _wb(weight, None, c)
    mean = np.asarray(mean, dtype=np.float64)
    invstd = np.asarray(invstd, dtype=np.float64)
    pg = per_channel(gy, axis)
    n = pg.shape[0]
    xmu = x64 - bshape(mean, nd, axis)
    sum_dy = pg.sum(axis=0)
    sum_dy_xmu = per_channel(gy * xmu, axis).sum(axis=0)
    grad_bias = sum_dy
    grad_weight = sum_dy_xmu * invstd
    gx = bshape(w * invstd, nd, axis) * (
        gy
        - bshape(sum_dy / n, nd, axis)
        - xmu * bshape(invstd * invstd * sum_dy_xmu / n, nd, axis)
    )
    return gx, grad_weight, grad_bias


def backward_eval(grad_y, x, running_mean, running_var, weight=None, eps=1e-5, axis: int = 1):
    """Gradient when the running statistics were used (constants w.r.t. x)."""
    x64 = np.asarray(x, dtype=np.float64)
    gy = np.asarray(grad_y, dtype=np.float64)
    nd = x64.ndim
    c = x64.shape[norm_axis(axis, nd)]
    w, _ = _wb(weight, None, c)
    invstd = 1.0 / np.sqrt(np.asarray(running_var, dtype=np.float64) + eps)
    gx = gy * bshape(w * invstd, nd, axis)
    xmu = x64 - bshape(running_mean, nd, axis)
    grad_weight = per_channel(gy * xmu, axis).sum(axis=0) * invstd
    grad_bias = per_channel(gy, axis).sum(axis=0)
    return gx, grad_weight, grad_bias


def fold(weight, bias, running_mean, running_var, gamma=None, beta=None, eps=1e-5,
         axis: int = 0):
    """Fold an eval-mode BN into the preceding layer: W' = W*alpha, b' = (b-mean)*alpha+beta.

    ``axis`` is the output-channel axis of ``weight`` (0 for conv/linear, 1 for
    transposed conv).
    """
    W = np.asarray(weight, dtype=np.float64)
    c = W.shape[norm_axis(axis, W.ndim)]
    g, bt = _wb(gamma, beta, c)
    alpha = g / np.sqrt(np.asarray(running_var, dtype=np.float64) + eps)
    b = np.zeros(c) if bias is None else np.asarray(bias, dtype=np.float64)
    Wf = W * bshape(alpha, W.ndim, axis)
    bf = (b - np.asarray(running_mean, dtype=np.float64)) * alpha + bt
    return Wf, bf


def linear(x, W, b=None):
    """y = x @ W.T + b, x (N, in), W (out, in)."""
    y = np.asarray(x, np.float64) @ np.asarray(W, np.float64).T
    if b is not None:
        y = y + np.asarray(b, np.float64)
    return y


def conv2d(x, W, b=None):
    """Valid, stride-1 2-D convolution (cross-correlation), x (N,Ci,H,W), W (Co,Ci,kh,kw)."""
    x = np.asarray(x, np.float64)
    W = np.asarray(W, np.float64)
    n, ci, h, w = x.shape
    co, ci2, kh, kw = W.shape
    assert ci == ci2
    oh, ow = h - kh + 1, w - kw + 1
    y = np.zeros((n, co, oh, ow))
    for i in range(kh):
        for j in range(kw):
            y += np.einsum("nchw,oc->nohw", x[:, :, i:i + oh, j:j + ow], W[:, :, i, j])
    if b is not None:
        y = y + np.asarray(b, np.float64).reshape(1, -1, 1, 1)
    return y


def conv_transpose2d_1x1(x, W, b=None):
    """1x1 transposed convolution, x (N,Ci,H,W), W (Ci,Co,1,1) (PyTorch layout)."""
    x = np.asarray(x, np.float64)
    W = np.asarray(W, np.float64)
    y = np.einsum("nchw,co->nohw", x, W[:, :, 0, 0])
    if b is not None:
        y = y + np.asarray(b, np.float64).reshape(1, -1, 1, 1)
    return y


class RefBatchNorm:
    """Stateful float64 model of BatchNorm1d/2d/3d (PyTorch semantics, DESIGN.md deviations).

    Deviation from PyTorch (DESIGN.md): a zero-size batch leaves all state alone and is
    not counted in num_batches_tracked.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, axis=1):
        c = num_features
        self.eps = eps
        self.momentum = momentum
        self.axis = axis
        self.training = True
        self.weight = np.ones(c) if affine else None
        self.bias = np.zeros(c) if affine else None
        if track_running_stats:
            self.running_mean = np.zeros(c)
            self.running_var = np.ones(c)
            self.num_batches_tracked = 0
        else:
            self.running_mean = self.running_var = None
            self.num_batches_tracked = None
        self._saved = None

    def forward(self, x):
        x64 = np.asarray(x, dtype=np.float64)
        use_batch = self.training or self.running_mean is None
        if x64.size == 0:
            self._saved = None
            return np.zeros(x64.shape)
        if use_batch:
            update = self.training and self.running_mean is not None
            if update:
                self.num_batches_tracked += 1
                mom = (1.0 / self.num_batches_tracked if self.momentum is None
                       else self.momentum)
                y, mean, invstd, rm, rv = forward_train(
                    x64, self.weight, self.bias, self.running_mean, self.running_var,
                    mom, self.eps, self.axis)
                self.running_mean, self.running_var = rm, rv
            else:
                y, mean, invstd, _, _ = forward_train(
                    x64, self.weight, self.bias, None, None, 0.0, self.eps, self.axis)
            self._saved = ("train", x64, mean, invstd)
        else:
            y = forward_eval(x64, self.running_mean, self.running_var, self.weight,
                             self.bias, self.eps, self.axis)
            self._saved = ("eval", x64, self.running_mean.copy(), self.running_var.copy())
        return y

    __call__ = forward

    def backward(self, grad_y):
        kind, x64, a, b = self._saved
        if kind == "train":
            return backward_train(grad_y, x64, a, b, self.weight, self.axis)
        return backward_eval(grad_y, x64, a, b, self.weight, self.eps, self.axis)


# ----------------------------------------------------------------- the other normalizations
#
# Each normalizes "groups" of values that share a mean and a variance. The helpers below
# view the data as float64 (groups, elements-of-a-group) rows, so one pair of formulas
# serves all of them:
#   y = (x - mean) * invstd * w + b,  invstd = 1/sqrt(var + eps)          (biased var)
#   grad_x = invstd * (g - mean(g) - xhat * mean(g * xhat)),  g = grad_y * w,
#   xhat = (x - mean) * invstd;  grad_w = sum(grad_y * xhat), grad_b = sum(grad_y)
# RMS: y = x * r * w, r = 1/sqrt(mean(x^2) + eps);
#   grad_x = r * (g - x * r^2 * mean(g * x)),  grad_w = sum(grad_y * x * r).


def _rows_stats(rows):
    mean, var = moments(rows.T)
    return mean, var


def _rows_backward(g, xhat, invstd):
    """grad_x of rows normalized with per-row invstd (mean and variance from the row)."""
    return invstd[:, None] * (g - g.mean(axis=1, keepdims=True)
                              - xhat * (g * xhat).mean(axis=1, keepdims=True))


def _trailing(x, nd):
    x64 = np.asarray(x, dtype=np.float64)
    lead = x64.shape[:x64.ndim - nd]
    return x64.reshape(int(np.prod(lead, dtype=np.int64)), -1), lead


def layer_norm(x, nd, weight=None, bias=None, eps=1e-5, residual=None):
    """LayerNorm over the last ``nd`` dims of ``x`` (plus ``residual`` first, when given).

    Returns ``(y, mean, invstd)``; mean/invstd of shape ``x.shape[:-nd]``."""
    x64 = np.asarray(x, dtype=np.float64)
    if residual is not None:
        x64 = x64 + np.asarray(residual, dtype=np.float64)
    rows, lead = _trailing(x64, nd)
    mean, var = _rows_stats(rows)
    invstd = 1.0 / np.sqrt(var + eps)
    y = (rows - mean[:, None]) * invstd[:, None]
    if weight is not None:
        y = y * np.asarray(weight, dtype=np.float64).reshape(1, -1)
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64).reshape(1, -1)
    return y.reshape(x64.shape), mean.reshape(lead), invstd.reshape(lead)


def rms_norm(x, nd, weight=None, eps=1e-5, residual=None):
    """RMSNorm over the last ``nd`` dims. Returns ``(y, invstd)``, invstd = 1/rms."""
    x64 = np.asarray(x, dtype=np.float64)
    if residual is not None:
        x64 = x64 + np.asarray(residual, dtype=np.float64)
    rows, lead = _trailing(x64, nd)
    invstd = 1.0 / np.sqrt((rows * rows).mean(axis=1) + eps)
    y = rows * invstd[:, None]
    if weight is not None:
        y = y * np.asarray(weight, dtype=np.float64).reshape(1, -1)
    return y.reshape(x64.shape), invstd.reshape(lead)


def layer_norm_backward(grad_y, x, nd, mean, invstd, weight=None):
    """Returns ``(grad_x, grad_weight, grad_bias)``; the last two of shape x.shape[-nd:]."""
    rows, _ = _trailing(x, nd)
    gy, _ = _trailing(grad_y, nd)
    mean = np.asarray(mean, np.float64).reshape(-1)
    invstd = np.asarray(invstd, np.float64).reshape(-1)
    w = 1.0 if weight is None else np.asarray(weight, np.float64).reshape(1, -1)
    xhat = (rows - mean[:, None]) * invstd[:, None]
    gx = _rows_backward(gy * w, xhat, invstd)
    shape = np.shape(x)[np.ndim(x) - nd:]
    return (gx.reshape(np.shape(x)), (gy * xhat).sum(axis=0).reshape(shape),
            gy.sum(axis=0).reshape(shape))


def rms_norm_backward(grad_y, x, nd, invstd, weight=None):
    """Returns ``(grad_x, grad_weight)``."""
    rows, _ = _trailing(x, nd)
    gy, _ = _trailing(grad_y, nd)
    r = np.asarray(invstd, np.float64).reshape(-1, 1)
    w = 1.0 if weight is None else np.asarray(weight, np.float64).reshape(1, -1)
    g = gy * w
    gx = r * (g - rows * r * r * (g * rows).mean(axis=1, keepdims=True))
    shape = np.shape(x)[np.ndim(x) - nd:]
    return gx.reshape(np.shape(x)), (gy * rows * r).sum(axis=0).reshape(shape)


def _groups(x, num_groups, axis):
    """(N*G, C/G*spatial) rows of ``x`` with its channel axis moved to 1, and that array."""
    xc = np.moveaxis(np.asarray(x, dtype=np.float64), norm_axis(axis, np.ndim(x)), 1)
    n = xc.shape[0]
    return xc.reshape(n * num_groups, -1), xc


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, axis: int = 1):
    """GroupNorm; returns ``(y, mean, invstd)`` with mean/invstd of shape (N, G)."""
    rows, xc = _groups(x, num_groups, axis)
    mean, var = _rows_stats(rows)
    invstd = 1.0 / np.sqrt(var + eps)
    yc = ((rows - mean[:, None]) * invstd[:, None]).reshape(xc.shape)
    c, nd = xc.shape[1], xc.ndim
    w, b = _wb(weight, bias, c)
    yc = yc * bshape(w, nd, 1) + bshape(b, nd, 1)
    n = xc.shape[0]
    return np.moveaxis(yc, 1, norm_axis(axis, nd)), mean.reshape(n, -1), invstd.reshape(n, -1)


def group_norm_backward(grad_y, x, num_groups, mean, invstd, weight=None, axis: int = 1):
    """Returns ``(grad_x, grad_weight, grad_bias)``, the last two (C,)."""
    rows, xc = _groups(x, num_groups, axis)
    gy, gyc = _groups(grad_y, num_groups, axis)
    c, nd = xc.shape[1], xc.ndim
    w, _ = _wb(weight, None, c)
    mean = np.asarray(mean, np.float64).reshape(-1)
    invstd = np.asarray(invstd, np.float64).reshape(-1)
    xhat = (rows - mean[:, None]) * invstd[:, None]
    g = (gyc * bshape(w, nd, 1)).reshape(rows.shape)
    gx = _rows_backward(g, xhat, invstd).reshape(xc.shape)
    ax = norm_axis(axis, nd)
    grad_weight = per_channel((gy * xhat).reshape(xc.shape), 1).sum(axis=0)
    grad_bias = per_channel(gyc, 1).sum(axis=0)
    return np.moveaxis(gx, 1, ax), grad_weight, grad_bias


def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
                  momentum=0.1, eps=1e-5, axis: int = 1):
    """InstanceNorm with per-instance statistics (use_input_stats=True).

    Returns ``(y, mean, invstd, new_running_mean, new_running_var)``, mean/invstd (N, C);
    the running statistics move towards the batch mean of the per-instance means and of
    the per-instance *unbiased* variances (torch's rule), None when not given."""
    c = np.shape(x)[norm_axis(axis, np.ndim(x))]
    y, mean, invstd = group_norm(x, c, weight, bias, eps, axis)
    new_rm = new_rv = None
    if running_mean is not None:
        n = np.size(x) // (np.shape(x)[0] * c)
        rows, _ = _groups(x, c, axis)
        var = _rows_stats(rows)[1].reshape(mean.shape)
        unbiased = var * n / (n - 1)
        new_rm = (1 - momentum) * np.asarray(running_mean, np.float64) + momentum * mean.mean(axis=0)
        new_rv = (1 - momentum) * np.asarray(running_var, np.float64) + momentum * unbiased.mean(axis=0)
    return y, mean, invstd, new_rm, new_rv


def instance_norm_backward(grad_y, x, mean, invstd, weight=None, axis: int = 1):
    c = np.shape(x)[norm_axis(axis, np.ndim(x))]
    return group_norm_backward(grad_y, x, c, mean, invstd, weight, axis)
