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



@pytest.mark.parametrize("linear_outputs", [4, 8], ids=["other-size", "same-size"])
def test_fold_model_leaves_a_linear_layer_before_a_batch_norm_2d(linear_outputs):
    """A linear layer acts on the last axis; a BatchNorm2d after it normalizes the channels:
    default discovery pairs a linear layer with a BatchNorm1d of its outputs only (as torch's
    fx fusion), so this model folds its conv pair and stays equal (it raised for 4 outputs
    and folded the wrong axis for 8, off by up to 2). Naming the pair is an error."""
    gen = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Conv2d(8, 8, 1), randomize_bn(nn.BatchNorm2d(8), gen), nn.Linear(6, linear_outputs),
                          randomize_bn(nn.BatchNorm2d(8), gen)).eval()
    x = torch.randn(2, 8, 6, 6, generator=gen)
    with torch.no_grad():
        expected = model(x)
        folded = bnt.fold_model(copy.deepcopy(model))
        assert [type(m) for m in folded] == [nn.Conv2d, nn.Identity, nn.Linear, nn.BatchNorm2d]
        torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"pairs: '2' is a Linear and batch norm '3' a BatchNorm2d"):
        bnt.fold_model(model, [("2", "3")])


@pytest.mark.parametrize("pairs, message", [
    ([("0", "1"), ("2", "1")], r"pairs: '2' has 4 outputs but batch norm '1' normalizes 8"),
    ([("0", "1"), ("0", "1")], r"pairs: '0' is named in more than one pair"),
    ([("0", "1"), ("2", "3"), ("2", "3")], r"pairs: '2' is named in more than one pair"),
    ([("0", "1"), ("2", "nope")], r"pairs: \('2', 'nope'\) names no submodule of model"),
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


def test_fold_model_names_pairs_whose_names_are_not_strings():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    with pytest.raises(TypeError, match=r"^pairs: names are strings, as model.get_submodule takes them; got \(0, 1\)$"):
        bnt.fold_model(model, [(0, 1)])
    assert [type(m) for m in model] == [nn.Conv2d, nn.BatchNorm2d]


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


def _folds_like_the_unfolded_model(model, x, expected_types):
    """fold_model(model) in float64 against the unfolded float64 model: the layer types after
    folding, and the outputs (float64 rounding of a different summation order)."""
    model = model.double().eval()
    x = x.double()
    with torch.no_grad():
        expected = model(x)
    assert bnt.fold_model(model) is model
    assert [type(m) for m in model.modules()][1:] == expected_types
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
    return model


def test_fold_model_pairs_only_children_that_follow_each_other():
    """A module listed twice in a Sequential (one ReLU reused) is two steps of the chain: the
    conv before its second use is not followed by the batch norm after it."""
    gen = torch.Generator().manual_seed(21)
    act = nn.ReLU()
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), act, nn.Conv2d(4, 4, 3, padding=1), act,
                          randomize_bn(nn.BatchNorm2d(4), gen))
    _folds_like_the_unfolded_model(model, torch.randn(2, 3, 6, 6, generator=gen),
                                   [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.BatchNorm2d])


def test_fold_model_leaves_subclasses_that_may_compute_otherwise():
    """Default discovery folds exact batch-norm classes inside plain Sequentials: a subclass
    of either may override forward (convert and torch's fuse_modules leave them alone too)."""
    class ScaledBN(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 3.0

    class Branches(nn.Sequential):  # its children summed, not chained
        def forward(self, x):
            return sum(m(x) for m in self)

    gen = torch.Generator().manual_seed(22)
    x = torch.randn(2, 4, 5, 5, generator=gen)
    _folds_like_the_unfolded_model(nn.Sequential(nn.Conv2d(4, 4, 1), randomize_bn(ScaledBN(4), gen)), x,
                                   [nn.Conv2d, ScaledBN])
    model = Branches(nn.Conv2d(4, 4, 1), randomize_bn(nn.BatchNorm2d(4), gen))
    _folds_like_the_unfolded_model(model, x, [nn.Conv2d, nn.BatchNorm2d])
    lazy = nn.Sequential(nn.Conv2d(3, 3, 1), nn.LazyBatchNorm2d()).eval()  # no statistics yet: left alone
    assert bnt.fold_model(lazy) is lazy and type(lazy[1]) is nn.LazyBatchNorm2d


def test_fold_model_folds_shared_blocks_once_and_shared_layers_at_each_place():
    """A block registered under two parents is one place: folded once, for both uses. A conv
    registered in two Sequentials with a batch norm after each is two places: each gets its
    own folded copy."""
    gen = torch.Generator().manual_seed(23)
    shared = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), randomize_bn(nn.BatchNorm2d(4), gen), nn.ReLU())
    conv = nn.Conv2d(4, 4, 1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Sequential(nn.Conv2d(3, 4, 1), shared)
            self.dec = nn.Sequential(shared, nn.Conv2d(4, 4, 1))
            self.left = nn.Sequential(conv, randomize_bn(nn.BatchNorm2d(4), gen))
            self.right = nn.Sequential(conv, randomize_bn(nn.BatchNorm2d(4), gen))

        def forward(self, x):
            h = self.dec(self.enc(x))
            return self.left(h) * self.right(h)

    model = Net().double().eval()
    x = torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    bnt.fold_model(model)
    assert type(shared[1]) is nn.Identity and model.enc[1] is model.dec[0]
    assert type(model.left[1]) is type(model.right[1]) is nn.Identity and model.left[0] is not model.right[0]
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


def test_fold_model_is_all_or_nothing_and_folds_again():
    """A fold that fails (torch's fusion cannot copy a pruned conv) leaves every pair as it
    was; a Linear into a batch norm without affine parameters folds; the Identity left in a
    batch norm's place is in eval mode, so fold_model runs again on the folded model."""
    import torch.nn.utils.prune as prune

    gen = torch.Generator().manual_seed(24)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), randomize_bn(nn.BatchNorm2d(4), gen),
                          nn.Conv2d(4, 4, 1), randomize_bn(nn.BatchNorm2d(4), gen)).eval()
    prune.l1_unstructured(model[2], "weight", 0.5)
    with pytest.raises(RuntimeError):
        bnt.fold_model(model)
    assert [type(m) for m in model] == [nn.Conv2d, nn.BatchNorm2d, nn.Conv2d, nn.BatchNorm2d]

    bn = nn.BatchNorm1d(6, affine=False)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(6, generator=gen))
        bn.running_var.copy_(torch.rand(6, generator=gen) + 0.5)
    model = nn.Sequential(nn.Conv1d(3, 4, 1), randomize_bn(nn.BatchNorm1d(4), gen), nn.Flatten(), nn.Linear(8, 6), bn)
    model = _folds_like_the_unfolded_model(model, torch.randn(2, 3, 2, generator=gen),
                                           [nn.Conv1d, nn.Identity, nn.Flatten, nn.Linear, nn.Identity])
    assert bnt.fold_model(model) is model  # again: nothing left to fold, and no training flag in the way


def test_fold_model_moves_batch_norm_hooks_and_keeps_pairs_with_hooks_in_between():
    """The batch norm's forward hooks move to the folded layer (they see the same output, as
    torch's fuse_modules moves them); a pair with a hook on the value between the two (the
    layer's forward hook, the batch norm's pre-hook) is not folded by default and is a
    ValueError when named, model unchanged."""
    gen = torch.Generator().manual_seed(25)
    x = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    seen = []
    model = nn.Sequential(nn.Conv2d(3, 4, 1), randomize_bn(nn.BatchNorm2d(4), gen)).double().eval()
    model[1].register_forward_hook(lambda mod, args, out: seen.append(out.clone()))
    with torch.no_grad():
        expected = model(x)
        bnt.fold_model(model)
        assert type(model[1]) is nn.Identity
        model(x)
    assert len(seen) == 2
    torch.testing.assert_close(seen[1], expected, rtol=1e-12, atol=1e-12)

    for hook_on in ("layer", "batch norm"):
        model = nn.Sequential(nn.Conv2d(3, 4, 1), randomize_bn(nn.BatchNorm2d(4), gen)).double().eval()
        if hook_on == "layer":
            model[0].register_forward_hook(lambda mod, args, out: out * 2)
        else:
            model[1].register_forward_pre_hook(lambda mod, args: (args[0] * 2,))
        with torch.no_grad():
            expected = model(x)
        bnt.fold_model(model)
        assert [type(m) for m in model] == [nn.Conv2d, nn.BatchNorm2d]
        with pytest.raises(ValueError, match="hooks"):
            bnt.fold_model(model, [("0", "1")])
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
