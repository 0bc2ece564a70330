"""The CPU inference path around the kernels: packed weights cached between calls and
invalidated by any in-place write or a new tensor.
"""
import gc

import pytest
import torch

import segnext_kernels as sk
from segnext_kernels.mlp import mlp_ref

pytestmark = pytest.mark.skipif("cpu" not in sk.op_backends().get("mlp", ()),
                                reason="segnext_kernels._C has no CPU kernels: "
                                       + sk.available_backends()["cpu"].reason)


def rel_err(a, ref):
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


def mlp_weights(C, hidden, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(hidden, C, 1, 1), (hidden,), (hidden, 1, 3, 3), (hidden,), (C, hidden, 1, 1), (C,)]
    return [torch.randn(s, generator=gen) * 0.3 for s in shapes]


def test_packed_weights_follow_in_place_writes_and_new_tensors():
    C, hidden = 24, 72
    ws = mlp_weights(C, hidden)
    x = torch.randn(1, C, 7, 9).contiguous(memory_format=torch.channels_last)
    ref = lambda: mlp_ref(x.double(), *[w.double() for w in ws])  # noqa: E731
    y0 = torch.ops.segnext.mlp_fwd(x, *ws)
    assert rel_err(y0, ref()) <= 1e-5
    # In place (the version counter moves): both packed weights are repacked.
    ws[0].mul_(-1.5)
    ws[4][3].add_(0.7)  # through a view
    y1 = torch.ops.segnext.mlp_fwd(x, *ws)
    assert rel_err(y1, ref()) <= 1e-5 and not torch.allclose(y0, y1)
    # A freed weight's entry is never matched by a new tensor, even at the same address.
    for _ in range(5):
        ws[0] = torch.randn_like(ws[0])
        ws[4] = torch.randn_like(ws[4]) * 0.1
        gc.collect()
        assert rel_err(torch.ops.segnext.mlp_fwd(x, *ws), ref()) <= 1e-5
    # Inference tensors (no version counter) are packed on every call.
    with torch.inference_mode():
        wi = [w.clone() for w in ws]
        yi = torch.ops.segnext.mlp_fwd(x, *wi)
        wi[0].mul_(2.0)
        yj = torch.ops.segnext.mlp_fwd(x, *wi)
    assert rel_err(yi, ref()) <= 1e-5
    assert rel_err(yj, mlp_ref(x.double(), *[w.double() for w in wi])) <= 1e-5
