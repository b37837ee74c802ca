"""SyncBatchNorm over torch.distributed (gloo on 127.0.0.1) in 2 and 4 spawned processes.

One launch per world size runs every case of sync_worker.CASES through three modules
(``batchnorm.SyncBatchNorm`` over the default group and over an explicit ProcessGroup, and
``batchnorm.torch.SyncBatchNorm`` with autograd), then the fault scenarios; the checks
here read what each rank saved. Every launch has a hard deadline: a hang fails the test.
"""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import re
import socket
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch was built without torch.distributed", allow_module_level=True)
if not dist.is_gloo_available():
    pytest.skip("torch was built without the gloo backend", allow_module_level=True)

import sync_check  # noqa: E402
import sync_worker  # noqa: E402

import batchnorm as bn  # noqa: E402
import batchnorm.torch as bnt  # noqa: E402

LAUNCH_DEADLINE_S = 120.0  # torch's import is most of it (several seconds per process)
FAULT_TIMEOUT_S = 2.0  # the process group's timeout in the fault launches


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(world, scenario, outdir, timeout_s=60.0, wait_for=None):
    """Start ``world`` spawned ranks running ``sync_worker.torch_main``; wait for the ranks
    in ``wait_for`` (all by default) up to the deadline, kill what is left; exit codes."""
    ctx = torch.multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=sync_worker.torch_main, daemon=True,
                         args=(rank, world, port, str(outdir), scenario, timeout_s))
             for rank in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + LAUNCH_DEADLINE_S
    waited = procs if wait_for is None else [procs[r] for r in wait_for]
    for p in waited:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, p in enumerate(procs) if p in waited and p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} of {world} still ran after {LAUNCH_DEADLINE_S} s: a hang"
    return [p.exitcode for p in procs]


def load(outdir, world):
    arrays, faults = [], []
    for rank in range(world):
        with np.load(os.path.join(outdir, f"rank{rank}.npz")) as f:
            arrays.append(dict(f))
        with open(os.path.join(outdir, f"rank{rank}.json")) as f:
            faults.append(json.load(f))
    return arrays, faults


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def numerics(request, tmp_path_factory):
    world = request.param
    outdir = tmp_path_factory.mktemp(f"sync_torch_{world}")
    codes = launch(world, "numerics", outdir)
    assert codes == [0] * world, f"exit codes {codes}"
    return (world,) + load(outdir, world)


IMPLS = ["np_default", "np_group", "torch"]


@pytest.mark.subprocess
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", sync_worker.CASES, ids=lambda c: c.name)
def test_ranks_equal_one_process_on_the_whole_batch(numerics, impl, case):
    world, arrays, _ = numerics
    sync_check.check_case(arrays, impl, case, world)


def _faults(numerics, prefix):
    world, _, faults = numerics
    return world, [{k[len(prefix):]: v for k, v in f.items() if k.startswith(prefix)} for f in faults]


@pytest.mark.subprocess
@pytest.mark.parametrize("prefix", ["np/", "torch/"])
def test_mismatched_ranks_raise_on_every_rank(numerics, prefix):
    world, faults = _faults(numerics, prefix)
    for rank, f in enumerate(faults):
        assert f["channels"]["raised"] == "ValueError", f["channels"]
        assert "num_features differs" in f["channels"]["message"]
        assert f"rank 0: 3, rank 1: 4" in f["channels"]["message"]
        assert f["dtype"]["raised"] == "TypeError", f["dtype"]
        assert "rank 0: float64, rank 1: float32" in f["dtype"]["message"]
        bad = f["bad_input"]
        if rank == world - 1:  # its own error, about its own input
            assert bad["raised"] == "ValueError" and "channels" in bad["message"], bad
        else:  # the others hear of it
            assert bad["raised"] == "RuntimeError", bad
            assert f"rank(s) [{world - 1}]" in bad["message"] and "raised in their forward" in bad["message"]
        assert f["after"]["raised"] is None, f["after"]  # the group still works
    assert len({f["after"]["value"] for f in faults}) == 1  # the same input on every rank
    sync_check.check_copies_of_checked_modules(faults)


@pytest.mark.subprocess
def test_numpy_module_faults_inside_a_step(numerics):
    world, faults = _faults(numerics, "np/")
    for rank, f in enumerate(faults):
        last = rank == world - 1
        dt = f["bad_dtype_input"]
        assert dt["raised"] == ("TypeError" if last else "RuntimeError"), dt
        grad = f["bad_grad"]
        assert grad["raised"] == ("ValueError" if last else "RuntimeError"), grad
        if not last:
            assert "raised in their backward" in grad["message"]
        out = f["bad_out"]  # a bad `out` on one rank: every rank raises, none counts the step
        assert out["raised"] == ("ValueError" if last else "RuntimeError"), out
        assert f["bad_out_counted"] == f["refused_out_counted"] == 0
        for name in ("zero_stride_out", "out_on_weight", "grad_out_on_weight"):  # the kernel's checks, made first
            assert f[name]["raised"] == ("ValueError" if last else "RuntimeError"), (name, f[name])
        grad_out = f["bad_grad_out"]
        assert grad_out["raised"] == ("TypeError" if last else "RuntimeError"), grad_out
        assert f["eval_local"] == {**f["eval_local"], "raised": None, "value": 0.0}
        # the whole batch empty: empty outputs, no state change, no one-value error
        assert f["all_empty"] == {**f["all_empty"], "raised": None, "value": [[0, 3, 2, 2], [0, 3, 2, 2], 0]}
        one = f["one_value"]
        assert one["raised"] == "ValueError" and "Expected more than 1 value per channel" in one["message"]


@pytest.mark.subprocess
@pytest.mark.parametrize("scenario", ["stops", "exits"])
def test_a_rank_that_leaves_mid_step_fails_the_others_in_time(tmp_path, scenario):
    """Rank 1 stops calling (alive) or exits in the second step: rank 0 raises within the
    group's timeout (plus slack for a busy machine), saying what happened."""
    codes = launch(2, scenario, tmp_path, timeout_s=FAULT_TIMEOUT_S, wait_for=[0])
    assert codes[0] == 0, codes
    with open(tmp_path / "rank0.json") as f:
        step2 = json.load(f)["step2"]
    assert step2["raised"] == "RuntimeError", step2
    assert "another rank raised, exited or stopped calling" in step2["message"]
    assert "failed on rank 0 of 2" in step2["message"]
    assert step2["seconds"] < FAULT_TIMEOUT_S + 10.0, step2


def test_uninitialised_process_group_raises_at_first_use():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    m = bnt.SyncBatchNorm(3)
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(RuntimeError, match="process group is not initialised"):
        m(x)
    assert int(m.num_batches_tracked) == 0  # a failed call changes nothing
    m.eval()
    assert m(x).shape == x.shape  # eval needs no group: plain batch norm


def test_destroyed_group_raises_and_a_world_of_one_is_plain_batch_norm(rng):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        group = dist.new_group([0])
        m = bn.SyncBatchNorm(3, comm=group)
        plain = bn.BatchNorm2d(3)
        x = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)
        np.testing.assert_array_equal(m(x), plain(x))  # one process: exactly BatchNorm2d
        np.testing.assert_array_equal(m.backward(x), plain.backward(x))
        tm, tplain = bnt.SyncBatchNorm(3), bnt.BatchNorm2d(3)
        np.testing.assert_array_equal(tm(torch.from_numpy(x)).detach().numpy(),
                                      tplain(torch.from_numpy(x)).detach().numpy())
        np.testing.assert_array_equal(tm.running_var.numpy(), tplain.running_var.numpy())
    finally:
        dist.destroy_process_group()
    with pytest.raises(RuntimeError, match="process group is not initialised"):
        m(x)
    assert int(m.num_batches_tracked) == 1


def test_comm_of_the_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match="comm must be None, an mpi4py communicator or a torch.distributed ProcessGroup"):
        bn.SyncBatchNorm(3, comm="world")


@pytest.mark.parametrize("group", ["world", 5, object()], ids=["str", "int", "object"])
def test_process_group_of_the_wrong_type_is_a_type_error_at_construction(group):
    """(torch's own SyncBatchNorm takes anything there and fails at the first step with words
    that do not name the argument.)"""
    message = "^process_group must be None or a torch.distributed ProcessGroup, got "
    with pytest.raises(TypeError, match=message):
        bnt.SyncBatchNorm(3, process_group=group)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=message):
        bnt.SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)
    assert type(model[1]) is torch.nn.BatchNorm2d  # nothing converted
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_drop_in_constructor_state_dict_and_conversion():
    ref = torch.nn.SyncBatchNorm(5, eps=1e-3, momentum=None, affine=True, bias=False)
    m = bnt.SyncBatchNorm(5, eps=1e-3, momentum=None, affine=True, bias=False)
    assert repr(m) == repr(ref)
    assert m.state_dict().keys() == ref.state_dict().keys()
    assert m.load_state_dict(ref.state_dict()) is not None
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4),
                                torch.nn.Sequential(torch.nn.BatchNorm1d(4)))
    bn_layer = model[1]
    group = torch.distributed.GroupMember.NON_GROUP_MEMBER  # a group (this rank outside it): stored as given
    out = bnt.SyncBatchNorm.convert_sync_batchnorm(model, group)
    assert out is model
    assert type(model[1]) is bnt.SyncBatchNorm and type(model[2][0]) is bnt.SyncBatchNorm
    assert model[1].process_group is group
    assert model[1].weight is bn_layer.weight and model[1].running_var is bn_layer.running_var
    again = bnt.convert(torch.nn.Sequential(torch.nn.BatchNorm2d(4), torch.nn.SyncBatchNorm(4), torch.nn.GroupNorm(2, 4),
                                            torch.nn.LayerNorm(4)), sync=True)
    assert [type(c) for c in again] == [bnt.SyncBatchNorm, bnt.SyncBatchNorm, bnt.GroupNorm, bnt.LayerNorm]
    assert again[0].process_group is None
    plain = bnt.convert(torch.nn.Sequential(torch.nn.BatchNorm2d(4)))
    assert type(plain[0]) is bnt.BatchNorm2d  # sync=False (default): the plain drop-in


@pytest.mark.parametrize("shape", [(3,), (2, 0)], ids=["1d", "no-channels"])
def test_eval_mode_input_checks_are_torchs(shape):
    """Without a process group (eval mode) the input is checked as torch's SyncBatchNorm
    checks it: its exception type and message, the statistics and counter untouched."""
    ref, m = torch.nn.SyncBatchNorm(3).eval(), bnt.SyncBatchNorm(3).eval()
    x = torch.randn(shape)
    with pytest.raises(ValueError) as expected:
        ref(x)
    with pytest.raises(ValueError, match=f"^{re.escape(str(expected.value))}$"):
        m(x)
    assert torch.equal(m.running_mean, ref.running_mean) and torch.equal(m.running_var, ref.running_var)
    assert int(m.num_batches_tracked) == 0


def test_convert_sync_keeps_hooks_and_attributes_and_checks_sync():
    """convert(model, sync=...) keeps what convert keeps (tensors, flags, hooks, attributes);
    a sync that is neither a bool nor a ProcessGroup is a TypeError naming it, the model as it was."""
    bn = torch.nn.BatchNorm2d(4)
    bn.tag = "stem"
    calls = []
    handle = bn.register_forward_hook(lambda *args: calls.append(1))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), bn, torch.nn.Sequential(torch.nn.SyncBatchNorm(4)))
    for bad in (None, 0, 1, "gloo"):
        with pytest.raises(TypeError, match=f"^sync must be True, False or a torch.distributed ProcessGroup, "
                                            f"got {type(bad).__name__}$"):
            bnt.convert(model, sync=bad)
        assert model[1] is bn and type(model[2][0]) is torch.nn.SyncBatchNorm
    bnt.convert(model, sync=True)
    new = model[1]
    assert type(new) is bnt.SyncBatchNorm and type(model[2][0]) is bnt.SyncBatchNorm
    assert new.tag == "stem" and new.weight is bn.weight and new.running_var is bn.running_var
    assert new.process_group is None and model[2][0].process_group is None
    new.eval()(torch.randn(2, 4, 3, 3))
    assert calls == [1]
    handle.remove()
    new(torch.randn(2, 4, 3, 3))
    assert calls == [1]


def test_pickle_and_copy_keep_the_token_of_the_last_check():
    """A copy keeps the job's token of its module's last peer check, so a rank that loads a
    copy decides as the rank that kept the original whether to check again (the ranks' runs
    in sync_worker._copies_of_checked_modules); a new job has tokens of its own."""
    m = bnt.SyncBatchNorm(3)
    m._peers_checked = 12345.0  # as _link records it after a checked step
    assert pickle.loads(pickle.dumps(m))._peers_checked == 12345.0
    assert copy.deepcopy(m)._peers_checked == 12345.0
    buffer = io.BytesIO()
    torch.save(m, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=False)._peers_checked == 12345.0


def test_numpy_module_on_a_non_member_rank_says_so_at_first_use():
    """``dist.new_group`` returns GroupMember.NON_GROUP_MEMBER on the ranks outside the group:
    taken by the constructor, refused at first use, as MPI.COMM_NULL is."""
    import torch.distributed as dist
    import batchnorm as bn
    m = bn.SyncBatchNorm(3, comm=dist.GroupMember.NON_GROUP_MEMBER)
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="this process is not in the group"):
        m(x)
    assert int(m.num_batches_tracked) == 0


def test_drop_in_on_a_non_member_rank_says_so_at_first_use():
    """``convert(model, sync=new_group(...))`` on a rank outside the group gets
    GroupMember.NON_GROUP_MEMBER: taken, as torch's convert_sync_batchnorm takes it; a training
    step refuses it naming process_group, with no state changed; eval needs no exchange."""
    import torch.distributed as dist
    outside = dist.GroupMember.NON_GROUP_MEMBER
    model = bnt.convert(torch.nn.Sequential(torch.nn.BatchNorm2d(3)), sync=outside)
    assert type(model[0]) is bnt.SyncBatchNorm and model[0].process_group == outside
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(ValueError, match="process_group is torch.distributed's GroupMember.NON_GROUP_MEMBER"):
        model(x)
    assert int(model[0].num_batches_tracked) == 0 and torch.equal(model[0].running_mean, torch.zeros(3))
    y = model.eval()(x)
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x.double(), torch.zeros(3).double(),
                                                                 torch.ones(3).double()).float())


def test_revert_undoes_convert_sync():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.SyncBatchNorm(4),
                                torch.nn.Sequential(torch.nn.SyncBatchNorm(4, affine=False)))
    tensors = {n: t for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    group = torch.distributed.ProcessGroup(0, 1)  # a group object; none is initialised
    bnt.convert(model, sync=group)
    assert type(model[1]) is bnt.SyncBatchNorm and type(model[2][0]) is bnt.SyncBatchNorm
    model[1]._peers_checked = ("torch.distributed", group)  # as after a training step
    out = bnt.revert(model)
    assert out is model
    assert type(model[1]) is torch.nn.SyncBatchNorm and type(model[2][0]) is torch.nn.SyncBatchNorm
    assert model[1].process_group is group and model[2][0].process_group is group
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert tensors[n] is t, n
    assert "_peers_checked" not in model[1].__dict__
    assert repr(model[1]) == repr(torch.nn.SyncBatchNorm(4))
    top = bnt.revert(bnt.SyncBatchNorm(3, process_group=group))
    assert type(top) is torch.nn.SyncBatchNorm and top.process_group is group
