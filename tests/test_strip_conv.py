"""The private strip-conv op (the benchmark's ``strip`` level): forward vs torch.nn.functional.conv2d."""
import pytest
import torch
import torch.nn.functional as F

from segnext_kernels import _extension
from segnext_kernels._strip_conv import strip_conv, strip_conv_ref

pytestmark = pytest.mark.skipif(not _extension.available(), reason="segnext_kernels._C not built")

SHAPES = [(1, 1, 1, 1), (2, 3, 5, 23), (1, 17, 20, 3), (2, 8, 7, 7), (1, 5, 1, 29), (1, 4, 31, 1)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [(1, 7), (7, 1), (1, 21), (21, 1), (11, 1)])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_matches_conv2d(shape, k, fmt):
    C = shape[1]
    x = torch.randn(shape).to(memory_format=fmt)
    w, b = torch.randn(C, 1, *k), torch.randn(C)
    out = torch.ops.segnext_C.strip_conv_forward(x, w, b)
    ref = F.conv2d(x.double(), w.double(), b.double(), padding=(k[0] // 2, k[1] // 2), groups=C)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert out.stride() == torch.empty_like(x).stride()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_dtypes_and_no_bias(dtype, tol):
    x = torch.randn(2, 6, 9, 13).to(dtype)
    w = torch.randn(6, 1, 1, 11).to(dtype)
    out = torch.ops.segnext_C.strip_conv_forward(x, w, None)
    ref = F.conv2d(x.double(), w.double(), None, padding=(0, 5), groups=6)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_public_wrapper_uses_op_and_falls_back_for_autograd():
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    w, b = torch.randn(4, 1, 7, 1), torch.randn(4)
    y = strip_conv(x, w, b)
    y.sum().backward()  # the reference carries autograd
    assert x.grad is not None
    torch.testing.assert_close(strip_conv(x.detach(), w, b), strip_conv_ref(x.detach(), w, b))


def test_rejects_bad_weight():
    with pytest.raises(ValueError, match=r"weight must have shape \(C, 1, 1, k\)"):
        strip_conv(torch.randn(1, 4, 6, 6), torch.randn(4, 1, 3, 3))
    with pytest.raises(ValueError, match="odd k"):
        strip_conv(torch.randn(1, 4, 6, 6), torch.randn(4, 1, 1, 4))
    with pytest.raises(RuntimeError, match="strip_conv_forward: weight must be"):
        torch.ops.segnext_C.strip_conv_forward(torch.randn(1, 4, 6, 6), torch.randn(3, 1, 1, 7), None)


def test_fake_tensor_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(2, 4, 8, 8).to(memory_format=torch.channels_last)
        y = torch.ops.segnext_C.strip_conv_forward(x, torch.empty(4, 1, 1, 7), torch.empty(4))
    assert y.shape == (2, 4, 8, 8) and y.stride() == x.stride()
