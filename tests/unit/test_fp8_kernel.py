"""The FP8 quantizer's kernels, Triton's (``sync.fp8_kernel``; compiled on a CUDA machine, run by Triton's
CPU interpreter elsewhere) and numba's (``sync.fp8_cpu_kernel``): their float32 -> e4m3 rounding equals
torch's cast on every boundary, and one launch over many tensors gives the bits of ``quantize_blocks``."""

from __future__ import annotations

from importlib.util import find_spec

import numpy as np
import pytest
import torch

from conftest import triton_kernels_run
from planners.quant import scale_shape

needs_triton = pytest.mark.skipif(not triton_kernels_run(), reason="needs Triton (compiled on CUDA or interpreted)")
needs_numba = pytest.mark.skipif(find_spec("numba") is None, reason="needs numba")
if triton_kernels_run():
    import triton

    import sync.fp8_kernel as fp8_kernel  # the kernels below reach it as a global


@pytest.fixture
def kernel():
    """``sync.fp8_kernel``, compiled on a CUDA machine, interpreted elsewhere."""
    return fp8_kernel


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def boundary_values() -> np.ndarray:
    """Every finite e4m3 value, every midpoint between neighbours (the ties) and one float32 step either
    side of each, the subnormal range, signed zeros, 448 and just above it, and random magnitudes."""
    codes = np.arange(0x7F, dtype=np.uint8)
    values = torch.from_numpy(codes).view(torch.float8_e4m3fn).float().numpy()
    mids = (values[:-1] + values[1:]) / 2
    near = np.concatenate([np.nextafter(mids, np.float32(0)), np.nextafter(mids, np.float32(np.inf))])
    rng = np.random.default_rng(0)
    random = np.exp(rng.uniform(np.log(2.0 ** -14), np.log(448.0), 20_000)).astype(np.float32)
    tiny = np.array([0.0, 2.0 ** -10, 3 * 2.0 ** -10, 2.0 ** -11, 1e-30, 1e-45, 448.0, 448.00003, 447.99997], np.float32)
    out = np.concatenate([values, mids, near, random, tiny]).astype(np.float32)
    return np.concatenate([out, -out])


@needs_triton
def test_the_triton_kernels_rounding_is_torchs_cast(kernel):
    tl = triton.language

    @triton.jit
    def convert(x, out, n, BLOCK: tl.constexpr):
        at = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out + at, fp8_kernel._e4m3_bits(tl.load(x + at, mask=at < n)), mask=at < n)

    x = torch.from_numpy(boundary_values())
    out = torch.empty(len(x), dtype=torch.uint8, device=_device())
    convert[(-(-len(x) // 1024),)](x.to(_device()), out, len(x), BLOCK=1024)
    out, want = out.cpu(), x.to(torch.float8_e4m3fn).view(torch.uint8)
    bad = torch.nonzero(out != want).ravel()
    assert not len(bad), [(x[i].item(), out[i].item(), want[i].item()) for i in bad[:5]]


@needs_numba
def test_the_numba_kernels_rounding_is_torchs_cast():
    from sync.fp8_cpu_kernel import e4m3_bits

    x = torch.from_numpy(boundary_values())
    out = np.array([e4m3_bits(w) for w in x.view(torch.int32).numpy().view(np.uint32).tolist()], dtype=np.uint8)
    want = x.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    bad = np.flatnonzero(out != want)
    assert not len(bad), [(x[i].item(), out[i], want[i]) for i in bad[:5]]


@pytest.mark.parametrize("kernels", [pytest.param("triton", marks=needs_triton), pytest.param("numba", marks=needs_numba)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_one_launch_quantizes_many_tensors_as_quantize_blocks(kernels, dtype):
    """Stacks of matrices, edge blocks, an all-zero block, magnitudes from 1e-3 to 1e2, tensors at odd
    element offsets of one allocation: each gets the bits and scales of quantize_blocks."""
    from sync.fp8 import QuantizeProgram, quantize_blocks

    gen = torch.Generator().manual_seed(0)
    shapes = [(300, 260), (2, 128, 200), (1, 1), (129, 127), (7, 3, 5), (256, 128)]
    device = _device() if kernels == "triton" else "cpu"
    pool = torch.empty(sum(int(np.prod(s)) + 3 for s in shapes), dtype=dtype, device=device)
    srcs, at = [], 1
    for i, s in enumerate(shapes):
        n = int(np.prod(s))
        srcs.append(pool[at: at + n].view(s))
        srcs[-1].copy_(torch.randn(s, generator=gen) * 10.0 ** (i - 3))
        at += n + 3
    srcs[0][:128, :128] = 0
    jobs = [(x.view(-1), torch.empty(x.numel(), dtype=torch.float8_e4m3fn, device=device),
             torch.full((int(np.prod(scale_shape(s))),), -1.0, device=device)) for x, s in zip(srcs, shapes)]
    program = QuantizeProgram(jobs, shapes, kernels=kernels)
    # one source dtype: one launch (numba reads bfloat16 and float32; float16 goes tensor by tensor)
    assert len(program.launches) == (0 if kernels == "numba" and dtype == torch.float16 else 1)
    program()
    for (x, val, scale), s in zip(jobs, shapes):
        want_val = torch.empty(s, dtype=torch.float8_e4m3fn, device=device)
        want_scale = torch.empty(scale_shape(s), device=device)
        quantize_blocks(x.view(s), want_val, want_scale)
        assert torch.equal(val.view(torch.uint8), want_val.view(-1).view(torch.uint8)), s
        assert torch.equal(scale, want_scale.view(-1)), s
