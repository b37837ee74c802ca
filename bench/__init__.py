"""Benchmark suite for batchnorm: every figure is a multiple of a memory copy.

Run from the repository root with ``python -m bench`` (see bench/README.md).

Modules, by what they hold:
  cases    shapes, memory layouts and the arrays of one benchmark case
  ops      the timed operations: copy floor, target ratio, float64 reference
  impls    one adapter per implementation (batchnorm, torch, onnxruntime, numpy)
  timing   calibrated, interleaved, paired timing with median and IQR
  runner   the loop over cases x operations x thread counts
  arguments  argparse types the entry points share (positive counts, durations, shapes)
  latency  per-call latency of a tiny input (call overhead, not bandwidth)
  torch_overhead  per-call cost of one layer: torch.nn.BatchNorm2d vs batchnorm.torch
  model    whole torch models (BN-heavy stack, ResNet-18 shape), with and without convert
  machine  CPU, caches, library versions
  report   latest.json and latest.md;  chart: latest.png
"""
