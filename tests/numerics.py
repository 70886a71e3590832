"""Tolerances that follow from the dtype and the length of a computation, not from one machine's rounding.

Two runs of the same math on different kernels (another CPU's ISA, the simulated device's dispatch, the
eager vs SDPA attention) agree only to rounding. Masks are decisions and are compared exactly; numbers are
compared with a bound derived here:

- :func:`sweep_atol`: a weight written by an OBS sweep (SparseGPT, GPTQ) over ``n = in_features`` columns.
  Each column update adds rounding of order ``eps * |W|`` and is carried into the later columns, so the
  error grows with ``n``; the damped inverse Hessian amplifies differences in the layer's inputs by its
  conditioning. ``CONDITIONING = 16`` covers it: across seeds the measured factor was at most 3.8
  (simulated device vs CPU on an AVX2-only EPYC; eager vs SDPA attention, ``test_rounding_noise``), while
  a wrong computation (a skipped compensation step) is off by ~1e4 of these units (tested there too).
- :func:`chain_rtol`: a scalar reduced from a forward pass (a perplexity, a KL, a Fisher trace): each of
  ``depth`` matmul/softmax stages adds relative rounding of order ``eps * sqrt(width)``.
"""

from __future__ import annotations

import math

import torch

CONDITIONING = 16


def eps(dtype: torch.dtype = torch.float32) -> float:
    return torch.finfo(dtype).eps


def sweep_atol(reference: torch.Tensor, dtype: torch.dtype = torch.float32) -> float:
    """Absolute tolerance for a 2-D weight produced by a column sweep over its inputs."""
    if reference.dim() != 2:
        return 0.0
    return CONDITIONING * eps(dtype) * reference.shape[1] * reference.abs().max().item()


def chain_rtol(depth: int, width: int, dtype: torch.dtype = torch.float32, factor: float = 16) -> float:
    """Relative tolerance for a scalar computed through ``depth`` stages of ``width``-long reductions."""
    return factor * eps(dtype) * depth * math.sqrt(width)


def assert_same_pruned(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                       dtype: torch.dtype = torch.float32) -> None:
    """Same zero pattern exactly; kept values within :func:`sweep_atol` of ``expected``'s layer."""
    assert actual.keys() == expected.keys()
    for name, want in expected.items():
        got = actual[name]
        assert torch.equal(got == 0, want == 0), f"{name}: zero patterns differ in {int(((got == 0) != (want == 0)).sum())} entries"
        torch.testing.assert_close(got, want, rtol=0, atol=sweep_atol(want, dtype), msg=name)
