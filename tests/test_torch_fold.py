"""Folding for torch users: batchnorm.fold on torch modules and tensors, batchnorm.torch.fold_model,
and batchnorm.torch.revert; compared with torch.nn.utils.fusion.fuse_conv_bn_eval /
fuse_linear_bn_eval (torch's own folding) and with the unfolded model's output.

Tolerance: folded weights are computed in float64 and rounded once to float32 (torch's
fusion computes in float32): rtol 1e-5, atol 1e-6 on weights; outputs of a folded model
differ from the unfolded one by float32 rounding of a different summation order (1e-5).
"""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import batchnorm  # noqa: E402
import batchnorm.torch as bnt  # noqa: E402

nn = torch.nn


def randomize_bn(bn, gen):
    with torch.no_grad():
        c = bn.num_features
        bn.weight.copy_(torch.rand(c, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=gen))
        bn.running_mean.copy_(torch.randn(c, generator=gen))
        bn.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    return bn.eval()


@pytest.mark.parametrize("converted", [False, True], ids=["torch-bn", "converted-bn"])
@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_fold_takes_torch_modules_and_tensors(converted, layer):
    gen = torch.Generator().manual_seed(0)
    if layer == "conv":
        lin, bn = nn.Conv2d(3, 6, 3).eval(), randomize_bn(nn.BatchNorm2d(6), gen)
        fused = torch.nn.utils.fusion.fuse_conv_bn_eval(lin, bn)
    else:
        lin, bn = nn.Linear(4, 6).eval(), randomize_bn(nn.BatchNorm1d(6), gen)
        fused = torch.nn.utils.fusion.fuse_linear_bn_eval(lin, bn)
    if converted:
        bn = bnt.convert(bn)
    w, b = batchnorm.fold(bn, lin.weight, lin.bias)
    assert isinstance(w, torch.Tensor) and isinstance(b, torch.Tensor)
    assert w.dtype == torch.float32 and w.shape == lin.weight.shape
    torch.testing.assert_close(w, fused.weight.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b, fused.bias.detach(), rtol=1e-5, atol=1e-6)
    # NumPy weights with a torch module: NumPy out
    wn, bn_ = batchnorm.fold(bn, lin.weight.detach().numpy(), None)
    assert type(wn) is np.ndarray
    np.testing.assert_allclose(wn, w.numpy(), rtol=1e-6)


def test_fold_refuses_a_training_torch_module():
    bn = nn.BatchNorm2d(3)
    with pytest.raises(ValueError, match="eval"):
        batchnorm.fold(bn, torch.ones(3, 2, 1, 1))


def cnn(seed=0):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)),
        nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5), nn.BatchNorm1d(5),
    )
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            randomize_bn(m, gen)
    return model.eval()


@pytest.mark.parametrize("converted", [False, True], ids=["torch", "converted"])
def test_fold_model_folds_every_sequential_pair(converted):
    model = cnn()
    if converted:
        bnt.convert(model)
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(x)
        reference = torch.nn.utils.fusion.fuse_conv_bn_eval(model[0], model[1])
    out = bnt.fold_model(model)
    assert out is model
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert [type(m) for m in (model[1], model[3][1], model[7])] == [nn.Identity] * 3
    torch.testing.assert_close(model[0].weight, reference.weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(model[0].bias, reference.bias, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_fold_model_explicit_pairs_outside_sequential():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = bnt.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) + 1

    gen = torch.Generator().manual_seed(3)
    model = Block()
    randomize_bn(model.bn, gen)
    model.eval()
    x = torch.randn(2, 3, 5, 5, generator=gen)
    with torch.no_grad():
        expected = model(x)
    assert bnt.fold_model(model) is model and type(model.bn) is bnt.BatchNorm2d  # nothing found
    bnt.fold_model(model, [("conv", "bn")])
    assert type(model.bn) is nn.Identity
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_fold_model_without_pairs_is_unchanged_and_training_is_an_error():
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1)).eval()
    state = copy.deepcopy(model.state_dict())
    assert bnt.fold_model(model) is model
    assert [type(m) for m in model] == [nn.ReLU, nn.BatchNorm2d, nn.Conv2d]
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    with pytest.raises(ValueError, match="eval"):
        bnt.fold_model(cnn().train())
    with pytest.raises(ValueError, match="eval"):
        m = cnn()
        m[3].train()  # one submodule in training mode
        bnt.fold_model(m)
    with pytest.raises(TypeError, match="pairs"):
        bnt.fold_model(cnn(), [("0", "2")])



@pytest.mark.parametrize("pairs, message", [
    ([("0", "1"), ("2", "1")], r"pairs: '2' has 4 outputs but batch norm '1' normalizes 8"),
    ([("0", "1"), ("0", "1")], r"pairs: '0' is named in more than one pair"),
    ([("0", "1"), ("2", "3"), ("2", "3")], r"pairs: '2' is named in more than one pair"),
])
def test_fold_model_refuses_pairs_that_cannot_fold_before_folding_any(pairs, message):
    """A layer whose output count is not the batch norm's feature count, or a module named in two
    pairs (the second fold would start again from the unfolded layer and lose the first), is a
    ValueError naming ``pairs``, raised before anything is folded."""
    gen = torch.Generator().manual_seed(11)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), randomize_bn(nn.BatchNorm2d(8), gen),
                          nn.Conv2d(8, 4, 1), randomize_bn(nn.BatchNorm2d(4), gen)).eval()
    x = torch.randn(2, 3, 6, 6, generator=gen)
    with torch.no_grad():
        expected = model(x)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        bnt.fold_model(model, pairs)
    assert [type(m) for m in model] == [nn.Conv2d, nn.BatchNorm2d, nn.Conv2d, nn.BatchNorm2d]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_fold_model_skips_or_refuses_a_batch_norm_without_running_statistics():
    """Found by default, such a batch norm is no foldable pair (it normalizes with the batch's
    statistics) and stays; named in ``pairs`` it is an error, raised before anything is
    folded, so a failed call leaves the whole model as it was."""
    gen = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), randomize_bn(bnt.BatchNorm2d(4), gen),
                          nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    x = torch.randn(2, 3, 5, 5, generator=gen)
    with torch.no_grad():
        expected = model(x)
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"pairs: batch norm '3' has no running statistics"):
        bnt.fold_model(model, [("0", "1"), ("2", "3")])
    assert [type(m) for m in model] == [type(m) for m in before]
    for (k, v), (k0, v0) in zip(model.state_dict().items(), before.state_dict().items()):
        assert k == k0 and torch.equal(v, v0)
    assert bnt.fold_model(model) is model
    assert [type(m) for m in model] == [nn.Conv2d, nn.Identity, nn.Conv2d, nn.BatchNorm2d]
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_revert_is_the_inverse_of_convert():
    model = cnn()
    tensors = {n: t for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    types = [type(m) for m in model.modules()]
    bnt.convert(model)
    assert type(model[1]) is bnt.BatchNorm2d and type(model[7]) is bnt.BatchNorm1d
    model(torch.randn(2, 3, 6, 6))  # fills the eval shortcut's cache
    out = bnt.revert(model)
    assert out is model
    assert [type(m) for m in model.modules()] == types
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert tensors[n] is t, n
    assert "_views" not in model[1].__dict__
    bare = bnt.BatchNorm2d(3)
    assert type(bnt.revert(bare)) is nn.BatchNorm2d


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_fold_model_folds_transposed_convolutions_of_one_group(dim):
    """A decoder's ConvTranspose -> BatchNorm pairs fold as torch's fuse_conv_bn_eval(transpose=True)
    folds them; a grouped one (whose weight torch's routine cannot scale) is left alone, and
    naming it is an error that changes nothing."""
    gen = torch.Generator().manual_seed(7 + dim)
    conv_t, norm = getattr(nn, f"ConvTranspose{dim}d"), getattr(nn, f"BatchNorm{dim}d")
    torch.manual_seed(dim)
    model = nn.Sequential(conv_t(4, 6, 3, stride=2), norm(6), nn.ReLU(),
                          conv_t(6, 4, 3, groups=2), norm(4))
    for m in (model[1], model[4]):
        randomize_bn(m, gen)
    model.eval()
    x = torch.randn(2, 4, *([5] * dim), generator=gen)
    with torch.no_grad():
        expected = model(x)
        reference = torch.nn.utils.fusion.fuse_conv_bn_eval(model[0], model[1], transpose=True)
    grouped = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="groups"):
        bnt.fold_model(model, [("0", "1"), ("3", "4")])
    assert [type(m) for m in model] == [conv_t, norm, nn.ReLU, conv_t, norm]  # nothing folded
    assert all(torch.equal(v, grouped[k]) for k, v in model.state_dict().items())
    bnt.fold_model(model)
    assert [type(m) for m in model] == [conv_t, nn.Identity, nn.ReLU, conv_t, norm]
    torch.testing.assert_close(model[0].weight, reference.weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(model[0].bias, reference.bias, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
