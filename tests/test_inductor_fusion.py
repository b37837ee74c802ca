"""The inductor pass that fuses batchnorm's operators with the ReLU / residual add after them.

Each compiled model is compared with torch's own model in eager mode (outputs, gradients,
running statistics) and checked, through the profiler, to run the fused operators where the
pattern allows and the plain ones where it does not (a shared intermediate, a broadcasting
add). The pass's installation keeps a user's own post-grad pass beside it.
"""

import copy

import pytest

torch = pytest.importorskip("torch")

import batchnorm.torch as bnt  # noqa: E402
from batchnorm import _inductor_fusion  # noqa: E402

nn = torch.nn
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # inductor's mkldnn modules


class Stem(nn.Module):
    """conv - BN - ReLU - max pool (ResNet's stem: the ReLU's mask is what backward saves),
    then conv - BN, + the pooled input, ReLU (a residual block's tail)."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):  # type: ignore[no-untyped-def]
        y = self.pool(torch.relu(self.bn1(self.conv1(x))))
        return torch.relu(self.bn2(self.conv2(y)) + y)


class InPlace(Stem):
    """The stem as torchvision writes it: ``nn.ReLU(inplace=True)`` and ``out += identity``."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):  # type: ignore[no-untyped-def]
        y = self.pool(self.relu(self.bn1(self.conv1(x))))
        out = self.bn2(self.conv2(y))
        out += y
        return self.relu(out)


class Shared(nn.Module):
    """BN outputs that other ops read too (nothing to fuse), and a broadcasting add."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shift = nn.Parameter(torch.linspace(-1, 1, channels).view(1, channels, 1, 1))

    def forward(self, x):  # type: ignore[no-untyped-def]
        y = self.bn1(self.conv(x))
        z = torch.relu(y) + y
        return torch.relu(self.bn2(z) + self.shift)


def models(cls, channels_last):
    torch.manual_seed(0)
    ref = cls()
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-1, 1)
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    if channels_last:
        ref = ref.to(memory_format=torch.channels_last)
    return ref, bnt.convert(copy.deepcopy(ref))


def data(channels_last, seed=1):
    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(seed)) * 2 + 1
    return x.to(memory_format=torch.channels_last) if channels_last else x


def ops_run(fn):
    """fn's result and the batchnorm ops it ran; a first call compiles, outside the profiler (which
    would also record the ops traced)."""
    fn()
    with torch.profiler.profile() as prof:
        result = fn()
    return result, {e.name for e in prof.events() if e.name.startswith("batchnorm::")}


def train_step(model, x):
    """Output, input gradient and ops of one forward + backward (after a first, compiling one,
    whose parameter gradients and running statistics are then undone)."""
    state = copy.deepcopy(model.state_dict())
    model(x.clone().requires_grad_(True)).square().sum().backward()
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with torch.profiler.profile() as prof:
        y = model(x)
        y.square().sum().backward()
    names = {e.name for e in prof.events() if e.name.startswith("batchnorm::")}
    return y.detach(), x.grad, names


@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("cls, fused, plain", [
    (Stem, {"batchnorm::batch_norm_train_relu", "batchnorm::not_positive"}, {"batchnorm::batch_norm_train"}),
    (InPlace, {"batchnorm::batch_norm_train_relu", "batchnorm::not_positive"}, {"batchnorm::batch_norm_train"}),
    (Shared, set(), {"batchnorm::batch_norm_train"}),
], ids=["stem", "inplace", "shared"])
def test_training_fuses_the_relu_where_nothing_else_reads_the_output(cls, fused, plain, channels_last,
                                                                     no_fallback):
    torch._dynamo.reset()
    ref, ours = models(cls, channels_last)
    compiled = torch.compile(ours, fullgraph=True)
    x = data(channels_last)
    y_ref, gx_ref, _ = train_step(ref, x)
    y, gx, names = train_step(compiled, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-4)
    assert names == fused | plain | {"batchnorm::batch_norm_backward"}
    for (name, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        # float32 sums of a few hundred products: rounding relative to the largest term
        scale = b.grad.abs().max().item()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
    for (name, a), (_, b) in zip(ours.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def eval_ops(cls, channels_last):
    """The batchnorm ops that a compiled eval-mode ``cls`` runs, its output checked."""
    torch._dynamo.reset()
    ref, ours = models(cls, channels_last)
    ref.eval()
    ours.eval()
    compiled = torch.compile(ours, fullgraph=True)
    x = data(channels_last)
    with torch.inference_mode():
        y, ran = ops_run(lambda: compiled(x))
        torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
    return ran


@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("cls, names", [
    (Stem, {"batchnorm::batch_norm_eval_act"}),  # BN - ReLU, BN + residual - ReLU
    (InPlace, {"batchnorm::batch_norm_eval_act"}),
    (Shared, {"batchnorm::batch_norm_eval"}),  # shared output, broadcasting add: unfused
], ids=["stem", "inplace", "shared"])
def test_inference_fuses_the_residual_and_relu(cls, names, channels_last, no_fallback):
    assert eval_ops(cls, channels_last) == names


def test_eval_add_without_relu_fuses_the_residual(no_fallback):
    torch._dynamo.reset()
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        ref.running_mean.uniform_(-1, 1)
        ref.weight.uniform_(0.5, 1.5)
    ours = bnt.convert(copy.deepcopy(ref))
    compiled = torch.compile(lambda x, r: ours(x) + r, fullgraph=True)
    x, r = data(False), data(False, seed=2)
    with torch.inference_mode():
        y, ran = ops_run(lambda: compiled(x, r))
        torch.testing.assert_close(y, ref(x) + r, rtol=1e-5, atol=1e-5)
    assert ran == {"batchnorm::batch_norm_eval_act"}


def test_the_pass_joins_a_users_own_pass_once():
    import torch._inductor.config as config

    seen = []

    def users_pass(graph):
        seen.append(graph)

    with config.patch(post_grad_custom_pre_pass=users_pass):
        _inductor_fusion.install()
        _inductor_fusion.install()
        assert list(config.post_grad_custom_pre_pass) == [users_pass, _inductor_fusion.FUSION_PASS]
        assert eval_ops(Stem, False) == {"batchnorm::batch_norm_eval_act"}
        assert seen  # the user's pass ran too


def test_the_environment_turns_the_pass_off(monkeypatch):
    import torch._inductor.config as config

    monkeypatch.setenv("BATCHNORM_INDUCTOR_FUSION", "0")
    with config.patch(post_grad_custom_pre_pass=None):
        _inductor_fusion.install()
        assert config.post_grad_custom_pre_pass is None
        assert eval_ops(Stem, False) == {"batchnorm::batch_norm_eval"}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_ops_take_inductors_conv_outputs_as_they_are(training, no_fallback):
    """Inductor lays conv outputs out channels-last on the CPU, NCHW model or not; the ops take
    any layout (``flexible_layout``), so each batchnorm op reads the conv's output buffer
    itself, with no kernel between them copying it back to the traced NCHW strides."""
    import re

    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    ref, ours = models(Stem, channels_last=False)
    ref.train(training)
    ours.train(training)
    compiled = torch.compile(ours, fullgraph=True)
    x = data(False)
    with torch._inductor.config.patch(force_disable_caches=True):  # compiled here, its code seen
        if training:
            y, codes = run_and_get_code(lambda: compiled(x.clone().requires_grad_(True)))
        else:
            with torch.inference_mode():
                y, codes = run_and_get_code(compiled, x)
    torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
    forward = codes[0]
    convs = set(re.findall(r"(buf\d+) = extern_kernels\.convolution\(", forward))
    inputs = re.findall(r"= torch\.ops\.batchnorm\.\w+\.default\((buf\d+),", forward)
    assert len(convs) == 2 and len(inputs) == 2
    assert set(inputs) == convs
