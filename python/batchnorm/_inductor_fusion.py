"""An inductor graph pass that fuses batchnorm's operators with the pointwise ops after them.

``torch.compile`` sees a ``batchnorm::`` operator as opaque: where torch's own batch norm
is fused by inductor with the ReLU and the residual add that follow it, the library's op
writes its output and inductor's next kernel reads it again (the BN stack of
``bench.model``, compiled inference: 0.60-0.88x of torch without the pass, 1.00-1.06x with
it). The pass rewrites, in the graphs inductor compiles after autograd:

- ``relu(batch_norm_train(x)[0])`` -> ``batch_norm_train_relu(x)[0]`` (the ReLU in the
  kernels' normalize pass; backward is unchanged, it reads the ReLU's mask as before), and
  that mask, ``y <= 0``, where autograd's partitioner saves it -> ``not_positive(y)``, NumPy's
  comparison: inductor 2.13's own bool stores ran at about 11 ns an element (5.7 ms for the
  stem's (8, 64, 32, 32) against 0.07 ms in NumPy, on an Intel Xeon);
- ``relu(batch_norm_eval(x) + r)``, ``batch_norm_eval(x) + r`` and ``relu(batch_norm_eval(x))``
  -> ``batch_norm_eval_act(x, residual=r, relu=...)`` (one pass, as the NumPy
  ``BatchNorm*d`` module's ``residual=`` / ``activation="relu"``),

only where the intermediate has no other user and the add does not broadcast.

The pass goes into ``torch._inductor.config.post_grad_custom_pre_pass`` beside any pass
already there, the first time a batchnorm operator is traced while inductor is loaded
(importing inductor at ``import batchnorm.torch`` would cost seconds). To compile without
it, set ``BATCHNORM_INDUCTOR_FUSION=0`` in the environment.
"""

from __future__ import annotations

import operator
import os
import sys
from typing import Any, Optional, TypeGuard

import torch
from torch.fx import Graph, Node

from . import _torch_ops as ops

_aten = torch.ops.aten


def _only_user(node: Node) -> Optional[Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _is(node: Any, *targets: Any) -> TypeGuard[Node]:
    """Whether ``node`` is a call of one of ``targets``."""
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def _same_layout(a: Node, b: Node) -> bool:
    """Whether two nodes' values (fake tensors in ``meta["val"]``) have one shape, strides and
    dtype: a residual the add does not broadcast, read in the input's memory order."""
    va, vb = a.meta.get("val"), b.meta.get("val")
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.shape == vb.shape and \
        va.stride() == vb.stride() and va.dtype == vb.dtype


def _fuse_train(graph: Graph, bn: Node) -> None:
    outputs = [u for u in bn.users if _is(u, operator.getitem) and u.args[1] == 0]
    relu = _only_user(outputs[0]) if len(outputs) == 1 else None
    if not _is(relu, _aten.relu.default):
        return
    bn.target = ops.batch_norm_train_relu
    relu.replace_all_uses_with(outputs[0])
    graph.erase_node(relu)
    for mask in list(outputs[0].users):
        if _is(mask, _aten.le.Scalar) and mask.args[1] == 0 and not mask.kwargs:
            mask.target, mask.args = ops.not_positive, (outputs[0],)


def _fuse_eval(graph: Graph, bn: Node) -> None:
    chain = [bn]  # bn, the add, the relu: each the only user of the one before
    residual = None
    after = _only_user(bn)
    if _is(after, _aten.add.Tensor) and not after.kwargs and len(after.args) == 2:
        residual = after.args[1] if after.args[0] is bn else after.args[0]
        if residual is bn or not isinstance(residual, Node) or not _same_layout(residual, bn):
            return
        chain.append(after)
        after = _only_user(after)
    relu = after if _is(after, _aten.relu.default) else None
    if relu is not None:
        chain.append(relu)
    if len(chain) == 1 or bn.kwargs:
        return
    last = chain[-1]
    with graph.inserting_before(last):
        fused = graph.call_function(ops.batch_norm_eval_act, (*bn.args, residual, relu is not None))
    fused.meta.update(last.meta)
    last.replace_all_uses_with(fused)
    for node in reversed(chain):
        graph.erase_node(node)


def fuse(graph: Graph) -> None:
    """The pass: every fusable batchnorm operator of ``graph``, rewritten in place."""
    for node in list(graph.nodes):
        if _is(node, ops.batch_norm_train):
            _fuse_train(graph, node)
        elif _is(node, ops.batch_norm_eval):
            _fuse_eval(graph, node)


def _pass_class() -> Any:
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class FusionPass(CustomGraphPass):
        """``fuse`` as an inductor custom pass; its uuid, part of inductor's cache key, hashes
        this file and the ops' definitions (their tags decide how inductor lowers them)."""

        def __call__(self, graph: Graph) -> None:
            fuse(graph)

        def uuid(self) -> Any:
            from . import _torch_norm_ops

            return get_hash_for_files((__file__, ops.__file__, _torch_norm_ops.__file__))

    return FusionPass


FUSION_PASS: Any = None  # the installed pass, once installed


def install() -> None:
    """Adds ``FUSION_PASS`` to inductor's post-grad pre-passes if inductor is loaded and the pass
    is not there yet (cheap when it is: called each time an operator is traced), unless
    ``BATCHNORM_INDUCTOR_FUSION=0``."""
    global FUSION_PASS
    if os.environ.get("BATCHNORM_INDUCTOR_FUSION") == "0":
        return
    config: Any = sys.modules.get("torch._inductor.config")
    if config is None or not hasattr(config, "post_grad_custom_pre_pass"):  # not loaded, or an older torch
        return
    from torch._inductor.custom_graph_pass import get_custom_graph_passes

    passes = get_custom_graph_passes(config.post_grad_custom_pre_pass)
    if FUSION_PASS is not None and any(p is FUSION_PASS for p in passes):
        return
    if FUSION_PASS is None:
        FUSION_PASS = _pass_class()()
    config.post_grad_custom_pre_pass = [*passes, FUSION_PASS] if passes else FUSION_PASS
