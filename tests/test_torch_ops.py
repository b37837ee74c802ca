"""batchnorm.torch under graph capture and function transforms: the batchnorm:: ops.

torch.compile (inductor), torch.export, torch.fx, torch.func (grad, vmap, jacrev), batched
gradients and forward-mode AD, each compared with torch's own BatchNorm on the same
parameters and data, and each checked to run batchnorm's kernels (the batchnorm:: ops in
the graph or the profiler, or torch's batch_norm made unreachable) -- except forward-mode
AD, which must hand off to torch's op (the kernels have no forward-mode rule).
"""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import batchnorm.torch as bnt  # noqa: E402
import reference  # noqa: E402
from batchnorm import _torch_ops  # noqa: E402

F = torch.nn.functional


def conv_bn(seed=0, channels_last=False, dtype=torch.float32):
    """(torch model, converted copy): conv - BN - ReLU, random BN parameters and statistics."""
    torch.manual_seed(seed)
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    with torch.no_grad():
        ref[1].weight.uniform_(0.5, 1.5)
        ref[1].bias.uniform_(-1, 1)
        ref[1].running_mean.uniform_(-1, 1)
        ref[1].running_var.uniform_(0.5, 2)
    ref = ref.to(dtype)
    if channels_last:
        ref = ref.to(memory_format=torch.channels_last)
    return ref, bnt.convert(copy.deepcopy(ref))


def data(channels_last=False, dtype=torch.float32, seed=1):
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2 + 1
    return x.to(memory_format=torch.channels_last) if channels_last else x


def assert_models_match(ours, ref, rtol=1e-5, atol=1e-5):
    for (name, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=name)


def op_names(graph):
    return [str(n.target) for n in graph.nodes if n.op == "call_function"]


def profiled_ops(fn):
    with torch.profiler.profile() as prof:
        result = fn()
    return result, {e.name for e in prof.events() if e.name.startswith("batchnorm::")}


# ---------------------------------------------------------------- the ops themselves


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("fmt", ["NCHW", "NHWC"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_opcheck(dtype, fmt, affine):
    """torch's own operator checks: schema, fake kernels, autograd registration, AOT dispatch."""
    x = data(fmt == "NHWC", dtype).requires_grad_(True)
    w = torch.rand(3, dtype=dtype, requires_grad=True) + 0.5 if affine else None
    b = torch.randn(3, dtype=dtype, requires_grad=True) if affine else None
    rm, rv = torch.randn(3, dtype=dtype), torch.rand(3, dtype=dtype) + 0.5
    checks = [
        (_torch_ops.batch_norm_train, (x, w, b, rm.clone(), rv.clone(), 0.1, 1e-5)),
        (_torch_ops.batch_norm_train, (x, w, b, None, None, 0.1, 1e-5)),
        (_torch_ops.batch_norm_eval, (x, w, b, rm, rv, 1e-5)),
        (_torch_ops.batch_norm_backward,  # not differentiable itself: double backward uses aten
         (torch.randn_like(x), x.detach(), None if w is None else w.detach(), rm, rv, True)),
    ]
    for op, args in checks:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


def odd_layouts(shape, dtype=torch.float64, seed=0):
    """(name, tensor) of ``shape`` in memory layouts inductor may hand a flexible-layout op."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    x = torch.randn(shape, generator=g, dtype=dtype)
    yield "contiguous", x
    yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    wide = torch.randn(n, 2 * c, h, w, generator=g, dtype=dtype).contiguous(memory_format=torch.channels_last)
    yield "channels_last_sliced", wide[:, ::2]
    yield "permuted", torch.randn(h, w, n, c, generator=g, dtype=dtype).permute(2, 3, 0, 1)
    yield "every_third", torch.randn(n, c, h, 3 * w, generator=g, dtype=dtype)[..., ::3]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channels_last_sliced", "permuted",
                                    "every_third"])
def test_flexible_layout_ops_match_their_fake_kernels_in_any_layout(layout):
    """The ops are tagged ``flexible_layout``: inductor may pass any strides, and then asserts
    that the output has the strides the fake kernel gave. So for every layout the real and
    fake kernels agree (``opcheck``'s fake-tensor test), and the values are torch's (float64,
    against ``torch.native_batch_norm`` and the composite norms)."""
    from batchnorm import _torch_norm_ops as norm_ops

    x = dict(odd_layouts((3, 4, 5, 6)))[layout]
    g = torch.Generator().manual_seed(1)
    w, b = torch.rand(4, generator=g, dtype=x.dtype) + 0.5, torch.randn(4, generator=g, dtype=x.dtype)
    rm, rv = torch.randn(4, generator=g, dtype=x.dtype), torch.rand(4, generator=g, dtype=x.dtype) + 0.5
    other = dict(odd_layouts((3, 4, 5, 6), seed=2))["permuted" if layout != "permuted" else "contiguous"]
    lw, lb = torch.rand(5, 6, generator=g, dtype=x.dtype) + 0.5, torch.randn(5, 6, generator=g, dtype=x.dtype)
    checks = [
        (_torch_ops.batch_norm_train, (x, w, b, rm.clone(), rv.clone(), 0.1, 1e-5)),
        (_torch_ops.batch_norm_train_relu, (x, w, b, rm.clone(), rv.clone(), 0.1, 1e-5)),
        (_torch_ops.batch_norm_eval, (x, w, b, rm, rv, 1e-5)),
        (_torch_ops.batch_norm_eval_act, (x, w, b, rm, rv, 1e-5, other, True)),
        (_torch_ops.batch_norm_backward, (other, x, w, rm, rv, True)),
        (_torch_ops.not_positive, (x,)),
        (norm_ops.layer_norm, (x, 2, lw, lb, 1e-5, False)),
        (norm_ops.group_norm, (x, 2, w, b, 1e-5)),
        (norm_ops.instance_norm_train, (x, w, b, rm.clone(), rv.clone(), 0.1, 1e-5)),
    ]
    for op, args in checks:
        result = torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
        assert all(v == "SUCCESS" for v in result.values()), (op, result)
    y, mean, invstd, _, _ = _torch_ops.batch_norm_train(x, w, b, rm.clone(), rv.clone(), 0.1, 1e-5)
    fused = _torch_ops.batch_norm_eval_act(x, w, b, rm, rv, 1e-5, other, True)
    layer = norm_ops.layer_norm(x, 2, lw, lb, 1e-5, False)[0]
    group = norm_ops.group_norm(x, 2, w, b, 1e-5)[0]
    y_ref, mean_ref, invstd_ref = torch.native_batch_norm(x, w, b, rm.clone(), rv.clone(), True, 0.1, 1e-5)
    eval_ref = torch.native_batch_norm(x, w, b, rm, rv, False, 0.1, 1e-5)[0]
    wants = [(y, y_ref), (mean, mean_ref), (invstd, invstd_ref), (fused, (eval_ref + other).relu()),
             (layer, F.layer_norm(x, (5, 6), lw, lb, 1e-5)), (group, F.group_norm(x, 2, w, b, 1e-5))]
    xn, (wn, bn, rmn, rvn) = x.numpy(), (t.numpy() for t in (w, b, rm, rv))
    np_y, np_mean, np_invstd, _, _ = reference.forward_train(xn, wn, bn)
    wants += [(y, np_y), (mean, np_mean), (invstd, np_invstd),
              (fused, reference.fused_eval(xn, rmn, rvn, wn, bn, 1e-5, 1, other.numpy(), "relu")),
              (layer, reference.layer_norm(xn, 2, lw.numpy(), lb.numpy())[0]),
              (group, reference.group_norm(xn, 2, wn, bn)[0])]
    for got, want in wants:
        torch.testing.assert_close(got, torch.as_tensor(want), rtol=1e-12, atol=1e-12)


def test_train_op_matches_torch_native_batch_norm(rng):
    x = torch.from_numpy(rng.standard_normal((5, 3, 4)) + 2)
    w, b = torch.from_numpy(rng.uniform(0.5, 1.5, 3)), torch.from_numpy(rng.standard_normal(3))
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    y, mean, invstd, new_mean, new_var = _torch_ops.batch_norm_train(x, w, b, rm, rv, 0.1, 1e-5)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    y_ref, mean_ref, invstd_ref = torch.native_batch_norm(x, w, b, rm_ref, rv_ref, True, 0.1, 1e-5)
    for got, want in ((y, y_ref), (mean, mean_ref), (invstd, invstd_ref), (new_mean, rm_ref),
                      (new_var, rv_ref)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(rm, torch.zeros(3, dtype=torch.float64))  # functional: inputs untouched


@pytest.mark.parametrize("fmt", ["NCHW", "NHWC"])
def test_fused_ops_match_torch_and_pass_opcheck(fmt, rng):
    """The ops the inductor pass inserts (no autograd: they live in graphs after it), in
    float64 against torch's native batch norm followed by the add and ReLU."""
    def tensor(*shape, low=None):
        t = torch.from_numpy(rng.uniform(low, 1.5, shape) if low is not None else rng.standard_normal(shape))
        return t.contiguous(memory_format=torch.channels_last) if len(shape) == 4 and fmt == "NHWC" else t
    x, r = tensor(4, 3, 5, 6) + 0.5, tensor(4, 3, 5, 6)
    w, b, rm, rv = tensor(3, low=0.5), tensor(3), tensor(3), tensor(3, low=0.5)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    y_ref, mean_ref, invstd_ref = torch.native_batch_norm(x, w, b, rm_ref, rv_ref, True, 0.1, 1e-5)
    y, mean, invstd, new_mean, new_var = _torch_ops.batch_norm_train_relu(x, w, b, rm, rv, 0.1, 1e-5)
    for got, want in ((y, y_ref.relu()), (mean, mean_ref), (invstd, invstd_ref), (new_mean, rm_ref),
                      (new_var, rv_ref)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert y.stride() == x.stride()
    eval_ref = torch.native_batch_norm(x, w, b, rm, rv, False, 0.1, 1e-5)[0]
    for residual, relu, want in ((r, True, (eval_ref + r).relu()), (r, False, eval_ref + r),
                                 (None, True, eval_ref.relu())):
        got = _torch_ops.batch_norm_eval_act(x, w, b, rm, rv, 1e-5, residual, relu)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    mask = _torch_ops.not_positive(y)
    assert mask.dtype == torch.bool and mask.stride() == y.stride() and torch.equal(mask, y <= 0)
    half = (y - 0.5).bfloat16()  # NumPy has no bfloat16: ATen compares it
    assert torch.equal(_torch_ops.not_positive(half), half <= 0)
    for op, args in ((_torch_ops.batch_norm_train_relu, (x, w, b, rm.clone(), rv.clone(), 0.1, 1e-5)),
                     (_torch_ops.batch_norm_eval_act, (x, w, b, rm, rv, 1e-5, r, True)),
                     (_torch_ops.not_positive, (y,))):
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


# ---------------------------------------------------------------- torch.fx


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fx_symbolic_trace_records_the_ops(training, no_fallback):
    ref, ours = conv_bn()
    ref.train(training)
    ours.train(training)
    gm = torch.fx.symbolic_trace(ours)
    expected = "batchnorm.batch_norm_train.default" if training else "batchnorm.batch_norm_eval.default"
    assert expected in op_names(gm.graph)
    x = data()
    for _ in range(2):  # the traced module updates the running statistics like torch's
        torch.testing.assert_close(gm(x), ref(x), rtol=1e-5, atol=1e-5)
    assert_models_match(ours, ref)
    assert int(ours[1].num_batches_tracked) == int(ref[1].num_batches_tracked) == (2 if training else 0)
    assert not ours[1].running_mean.requires_grad


def test_fx_momentum_none_in_training_says_why():
    model = torch.nn.Sequential(bnt.BatchNorm1d(3, momentum=None))
    with pytest.raises(RuntimeError, match="momentum=None"):
        torch.fx.symbolic_trace(model)
    torch.fx.symbolic_trace(model.eval())  # eval mode traces


def test_fx_fusion_and_fuse_modules_on_converted_models():
    """fx's conv-BN fusion (exact torch types) leaves the converted layer as a batchnorm op;
    fuse_modules takes the converted types through FUSER_METHOD_MAPPING; both give
    the unfused model's output."""
    from torch.fx.experimental.optimization import fuse
    ref, ours = conv_bn()
    ref.eval()
    ours.eval()
    x = data()
    fused = fuse(ours)
    assert "batchnorm.batch_norm_eval.default" in op_names(fused.graph)
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
    from torch.ao.quantization import fuse_modules
    q = fuse_modules(ours, [["0", "1", "2"]], fuse_custom_config_dict={
        "additional_fuser_method_mapping": bnt.FUSER_METHOD_MAPPING})
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in q.modules())
    torch.testing.assert_close(q(x), ref(x), rtol=1e-5, atol=1e-5)
    q = fuse_modules(bnt.revert(copy.deepcopy(ours)), [["0", "1"]])  # or: revert first
    torch.testing.assert_close(torch.relu(q(x)), ref(x), rtol=1e-5, atol=1e-5)


def test_fuser_mapping_covers_torchs_batch_norm_fusions_and_qat():
    """Every fusion of torch's default mapping that holds a batch norm works on the drop-ins
    through FUSER_METHOD_MAPPING: eval fusions give the unfused model's output (conv-BN-ReLU,
    transposed conv-BN, BN-ReLU; they raised \"did not find fuser method\"), and
    fuse_modules_qat builds torch's QAT modules (they raised on the drop-in's type), which
    train as torch's fused QAT model does."""
    from torch.ao.quantization import fuse_modules, fuse_modules_qat
    config = {"additional_fuser_method_mapping": bnt.FUSER_METHOD_MAPPING}
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.ConvTranspose2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 4, 1),
                              torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    with torch.no_grad():
        for i in (1, 3, 5):
            ref[i].weight.uniform_(0.5, 1.5)
            ref[i].running_var.uniform_(0.5, 2)
    groups = [["0", "1"], ["2", "3", "4"], ["5", "6"]]
    x = data()
    ours = bnt.convert(copy.deepcopy(ref)).eval()
    fused = fuse_modules(ours, groups, fuse_custom_config_dict=config)
    assert not any(type(m) in (bnt.BatchNorm2d, torch.nn.BatchNorm2d) for m in (fused[0], fused[2]))
    x64 = x.double()
    torch.testing.assert_close(fused(x), ref.eval()(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused(x).double(), copy.deepcopy(ref).double().eval()(x64), rtol=1e-4, atol=1e-4)
    tail = torch.nn.Sequential(*list(ref)[2:])  # torch fuses no transposed conv with a batch norm for QAT
    qat_ref = fuse_modules_qat(copy.deepcopy(tail).train(), [["0", "1", "2"], ["3", "4"]])
    qat = fuse_modules_qat(bnt.convert(copy.deepcopy(tail)).train(), [["0", "1", "2"], ["3", "4"]],
                           fuse_custom_config_dict=config)
    assert [type(m) for m in qat] == [type(m) for m in qat_ref]
    h = torch.randn(4, 4, 6, 6)
    torch.testing.assert_close(qat(h), qat_ref(h), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- torch.export, torch.compile


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_export_records_the_ops(training, no_fallback):
    ref, ours = conv_bn()
    ref.train(training)
    ours.train(training)
    x = data()
    ep = torch.export.export(ours, (x,))
    expected = "batchnorm.batch_norm_train.default" if training else "batchnorm.batch_norm_eval.default"
    assert expected in op_names(ep.graph)
    exported = ep.module()
    torch.testing.assert_close(exported(x), ref(x), rtol=1e-5, atol=1e-5)
    if training:  # the exported program updates its own copies of the buffers, like torch's
        for name in ("1.running_mean", "1.running_var"):
            torch.testing.assert_close(exported.state_dict()[name], ref.state_dict()[name],
                                       rtol=1e-5, atol=1e-5)


def assert_within_one_ulp(got, want64, dtype, what):
    """Every value of ``got`` (``dtype``) within one unit in the last place of the float64 ``want64``."""
    ulp = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(want64.abs().clamp_min(torch.finfo(dtype).tiny))))
    err = (got.double() - want64).abs()
    assert bool((err <= ulp).all()), f"{what}: {float((err / ulp).max()):.2f} ulp"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("capture", ["fx", "export"])
def test_half_parameter_models_capture_the_ops(capture, training, dtype, no_fallback):
    """model.bfloat16() / model.half(): fx.symbolic_trace (where the dtypes are known only when
    the graph runs) and torch.export record the ops on float32 copies of the half parameters
    and statistics, which are written back in their dtype; outputs and running statistics within
    one ulp of the float64 computation on the same values. (fx's graph failed in the op with
    half parameters; export recorded aten.batch_norm.)"""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
    with torch.no_grad():
        for name, low, high in (("weight", 0.5, 1.5), ("bias", -1, 1), ("running_mean", -1, 1), ("running_var", 0.5, 2)):
            getattr(model[0], name).uniform_(low, high)
    model = bnt.convert(model).train(training).to(dtype)
    before = {k: v.double() for k, v in model[0].state_dict().items()}
    x = data(dtype=dtype)
    if capture == "fx":
        run = gm = torch.fx.symbolic_trace(model)
        graph, state = gm.graph, model[0].state_dict
    else:
        ep = torch.export.export(model, (x,))
        run = ep.module()
        graph, state = ep.graph, lambda: {k[2:]: v for k, v in run.state_dict().items()}
    assert f"batchnorm.batch_norm_{'train' if training else 'eval'}.default" in op_names(graph)
    y = run(x)
    assert y.dtype == dtype
    x64, eps = x.double(), model[0].eps
    if training:
        mean, var = x64.mean((0, 2, 3)), x64.var((0, 2, 3), unbiased=False)
    else:
        mean, var = before["running_mean"], before["running_var"]
    per = (-1, 1, 1)
    want = (x64 - mean.view(per)) / torch.sqrt(var.view(per) + eps) * before["weight"].view(per) + before["bias"].view(per)
    assert_within_one_ulp(y, want, dtype, "y")
    if training:
        n = x64.numel() / 3
        assert_within_one_ulp(state()["running_mean"], 0.9 * before["running_mean"] + 0.1 * mean, dtype, "running_mean")
        assert_within_one_ulp(state()["running_var"], 0.9 * before["running_var"] + 0.1 * var * n / (n - 1), dtype,
                              "running_var")


@pytest.mark.parametrize("norm", ["BatchNorm2d", "GroupNorm", "InstanceNorm2d"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_under_cpu_autocast_runs_the_ops(norm, training):
    """torch.compile inside torch.autocast("cpu", bfloat16): the conv hands the norm bfloat16,
    the norm runs batchnorm's op (it fell back to torch's function under autocast) with torch's
    result, and that of a float64 computation on the same bfloat16 input."""
    torch._dynamo.reset()
    make = {"BatchNorm2d": lambda: torch.nn.BatchNorm2d(4), "GroupNorm": lambda: torch.nn.GroupNorm(2, 4),
            "InstanceNorm2d": lambda: torch.nn.InstanceNorm2d(4, affine=True)}[norm]
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), make()).train(training)
    with torch.no_grad():
        ref[1].weight.uniform_(0.5, 1.5)
        ref[1].bias.uniform_(-1, 1)
    ours = bnt.convert(copy.deepcopy(ref))
    seen = []

    def backend(gm, example_inputs):
        seen.extend(op_names(gm.graph))
        return gm.forward
    x = data()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.compile(ours, backend=backend)(x)
        h = ref[0](x)  # the bfloat16 the norm receives
        y_ref = ref[1](h)
    assert any(name.startswith("batchnorm.") for name in seen), seen
    assert y.dtype == y_ref.dtype == h.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=1e-2, atol=1e-2)
    h64 = h.double()
    dims = (0, 2, 3) if norm == "BatchNorm2d" else (2, 3)
    if norm == "GroupNorm":
        g = h64.view(4, 2, 2, 8, 8)
        mean, var = g.mean((2, 3, 4), keepdim=True), g.var((2, 3, 4), unbiased=False, keepdim=True)
        xhat = ((g - mean) / torch.sqrt(var + 1e-5)).view_as(h64)
    elif norm == "BatchNorm2d" and not training:
        xhat = (h64 - ref[1].running_mean.double().view(-1, 1, 1)) / torch.sqrt(ref[1].running_var.double().view(-1, 1, 1) + 1e-5)
    else:
        mean, var = h64.mean(dims, keepdim=True), h64.var(dims, unbiased=False, keepdim=True)
        xhat = (h64 - mean) / torch.sqrt(var + 1e-5)
    want = xhat * ref[1].weight.double().view(-1, 1, 1) + ref[1].bias.double().view(-1, 1, 1)
    assert_within_one_ulp(y, want, torch.bfloat16, "y")


def test_compile_with_momentum_none_does_not_recompile_every_step():
    """momentum=None (a cumulative average, factor 1/num_batches_tracked) in training under
    torch.compile: the batch norm runs between graphs, as torch's own module ends up running,
    not in a graph specialized on the factor (one recompilation per step, up to dynamo's
    limit); running statistics and outputs as torch's, step after step."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4, momentum=None))
    ours = bnt.convert(copy.deepcopy(ref))
    ref64 = copy.deepcopy(ref).double()
    compiled = torch.compile(ours)
    for step in range(6):
        x = data(seed=step)
        y = compiled(x)
        torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y.double(), ref64(x.double()), rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    assert_models_match(ours, ref)
    assert_models_match(copy.deepcopy(ours[1]).double(), ref64[1])
    assert int(ours[1].num_batches_tracked) == 6


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # inductor's mkldnn modules use torch.jit
@pytest.mark.parametrize("fmt", ["NCHW", "NHWC"])
def test_inductor_training_runs_the_ops(fmt, no_fallback):
    torch._dynamo.reset()
    ref, ours = conv_bn(channels_last=fmt == "NHWC")
    compiled = torch.compile(ours, fullgraph=True)  # no graph break around the ops
    grads = []
    for model in (ref, compiled):
        x = data(fmt == "NHWC").requires_grad_(True)
        (y, names) = profiled_ops(lambda: model(x))
        y.square().sum().backward()
        grads.append((y.detach(), x.grad, names))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-4, atol=1e-5)
    assert "batchnorm::batch_norm_train_relu" in grads[1][2]  # fused with the ReLU after it
    assert_models_match(ours, ref)
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(ours[1], name).grad, getattr(ref[1], name).grad,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # inductor's mkldnn modules use torch.jit
def test_inductor_inference_runs_the_ops(no_fallback):
    torch._dynamo.reset()
    ref, ours = conv_bn()
    ref.eval()
    ours.eval()
    compiled = torch.compile(ours, fullgraph=True)  # no graph break around the ops
    x = data()
    with torch.no_grad():
        y, names = profiled_ops(lambda: compiled(x))
        torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
    assert "batchnorm::batch_norm_eval_act" in names  # fused with the ReLU after it


# ---------------------------------------------------------------- torch.func


def linear_bn(track=True, seed=0):
    torch.manual_seed(seed)
    ref = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4, track_running_stats=track))
    return ref, bnt.convert(copy.deepcopy(ref))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_func_grad_over_parameters_with_functional_call(training, no_fallback):
    """functorch's test_grad_... pattern: grad of a loss over a dict of parameters."""
    from torch.func import functional_call, grad
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(2))
    results = []
    for model in linear_bn():
        model.train(training)
        params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
        g = grad(lambda p, b: functional_call(model, (p, b), (x,)).square().sum())(params, buffers)
        results.append((g, buffers))
    ref_grads, our_grads = results[0][0], results[1][0]
    for name in ref_grads:
        torch.testing.assert_close(our_grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    for name in results[0][1]:
        torch.testing.assert_close(results[1][1][name], results[0][1][name], msg=name)


def _ensemble(models, x, in_dims):
    from torch.func import functional_call, stack_module_state, vmap
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    out = vmap(lambda p, b, xx: functional_call(base, (p, b), (xx,)), in_dims=in_dims)(params, buffers, x)
    return out, buffers


@pytest.mark.parametrize("track", [True, False], ids=["running-stats", "no-running-stats"])
def test_vmap_model_ensembling(track, no_fallback):
    """torch's model-ensembling recipe: vmap over stacked parameters (and buffers)."""
    outs = []
    for model in linear_bn(track=track):
        models = [copy.deepcopy(model) for _ in range(3)]
        for i, m in enumerate(models):
            with torch.no_grad():
                m[0].weight.mul_(i + 1)
                m[1].weight.add_(i)
        if track:  # training updates the (stacked) running statistics: one batch per model
            x = torch.randn(3, 8, 3, generator=torch.Generator().manual_seed(3))
            outs.append(_ensemble(models, x, (0, 0, 0)))
        else:  # the same minibatch for every model
            x = torch.randn(8, 3, generator=torch.Generator().manual_seed(3))
            outs.append(_ensemble(models, x, (0, 0, None)))
    (ref, ref_buffers), (ours, our_buffers) = outs
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for name in ref_buffers:
        torch.testing.assert_close(our_buffers[name], ref_buffers[name], msg=name)


def test_vmap_training_with_unbatched_running_stats_is_an_error():
    from torch.func import vmap
    x = torch.randn(3, 8, 4)
    rm, rv = torch.zeros(4), torch.ones(4)
    with pytest.raises(RuntimeError, match="running"):
        vmap(lambda xx: bnt.batch_norm(xx, rm, rv, training=True))(x)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_vmap_over_input_and_weight_in_dims(training, no_fallback):
    """Independent batch norms per vmapped slice, batch dim not first, equal to a loop."""
    from torch.func import vmap
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 3, 4, 5, generator=gen, dtype=torch.float64)  # vmapped dim: 2
    w = torch.rand(4, 3, generator=gen, dtype=torch.float64) + 0.5  # vmapped dim: 0
    rm = torch.randn(3, 4, generator=gen, dtype=torch.float64)  # vmapped dim: 1
    rv = torch.rand(3, 4, generator=gen, dtype=torch.float64) + 0.5
    rm_ref, rv_ref = rm.clone(), rv.clone()
    y = vmap(lambda xx, ww, m, v: bnt.batch_norm(xx, m, v, ww, None, training),
             in_dims=(2, 0, 1, 1))(x, w, rm, rv)
    for k in range(4):
        m, v = rm_ref[:, k].clone(), rv_ref[:, k].clone()
        expected = F.batch_norm(x[:, :, k], m, v, w[k], None, training)
        torch.testing.assert_close(y[k], expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rm[:, k], m, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rv[:, k], v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_jacrev_matches_torch(training):
    from torch.func import jacrev
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    w = torch.rand(3, generator=gen, dtype=torch.float64) + 0.5
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64) * 2
    ours = jacrev(lambda xx, ww: bnt.batch_norm(xx, rm.clone(), rv.clone(), ww, None, training),
                  argnums=(0, 1))(x, w)
    ref = jacrev(lambda xx, ww: F.batch_norm(xx, rm.clone(), rv.clone(), ww, None, training),
                 argnums=(0, 1))(x, w)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- batched gradients


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_is_grads_batched_matches_torch(training, no_fallback):
    ref, ours = linear_bn()
    results = []
    for model in (ref, ours):
        model.train(training)
        x = torch.randn(8, 3, generator=torch.Generator().manual_seed(6)).requires_grad_(True)
        y = model(x)
        basis = torch.eye(y.numel()).view(-1, *y.shape)
        results.append(torch.autograd.grad(y, (x, model[1].weight), basis, is_grads_batched=True))
    for a, b in zip(results[1], results[0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_with_batched_grad(training, rng):
    """torch's gradcheck with check_batched_grad (vmap over the backward) in float64."""
    x = torch.from_numpy(rng.standard_normal((4, 3, 5))).requires_grad_(True)
    w = torch.from_numpy(rng.uniform(0.5, 1.5, 3)).requires_grad_(True)
    b = torch.from_numpy(rng.standard_normal(3)).requires_grad_(True)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)

    def f(x, w, b):
        return bnt.batch_norm(x, rm.clone(), rv.clone(), w, b, training)
    assert torch.autograd.gradcheck(f, (x, w, b), check_batched_grad=True)


# ---------------------------------------------------------------- forward-mode AD


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_ad_hands_off_to_torch_and_keeps_the_tangent(training, fallback_calls):
    import torch.autograd.forward_ad as fwAD
    from torch.func import jvp
    gen = torch.Generator().manual_seed(7)
    x, t = torch.randn(8, 3, generator=gen), torch.randn(8, 3, generator=gen)
    w, b = torch.rand(3, generator=gen) + 0.5, torch.randn(3, generator=gen)
    stats = (None, None) if training else (torch.randn(3, generator=gen), torch.rand(3, generator=gen) + 0.5)
    with torch.no_grad():  # nothing requires grad: the tangent must still flow
        out_ref, tan_ref = jvp(lambda xx: F.batch_norm(xx, *stats, w, b, training), (x,), (t,))
        out, tan = jvp(lambda xx: bnt.batch_norm(xx, *stats, w, b, training), (x,), (t,))
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(tan, tan_ref)
    assert len(fallback_calls) == 1
    ref, ours = linear_bn()
    ref.train(training)
    ours.train(training)
    with fwAD.dual_level():  # eager forward AD through the module
        y_ref = fwAD.unpack_dual(ref(fwAD.make_dual(x, t))).tangent
        y = fwAD.unpack_dual(ours(fwAD.make_dual(x, t))).tangent
    assert y is not None
    torch.testing.assert_close(y, y_ref)
    assert len(fallback_calls) == 2
    assert_models_match(ours, ref)
    ours(x)  # no dual tensor: the kernels again
    assert len(fallback_calls) == 2
