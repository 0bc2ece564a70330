"""MSCA reference: the spec against a plain transcription of the official module, gradcheck,
module parameter names, and input validation."""
import pytest
import torch
import torch.nn.functional as F

import segnext_kernels as sk
from segnext_kernels.msca.reference import weight_shapes


def random_weights(C, dtype=torch.float64, requires_grad=False):
    ws = [torch.randn(s, dtype=dtype) * (0.3 if len(s) > 1 else 0.1) for s in weight_shapes(C)]
    for w in ws:
        w.requires_grad_(requires_grad)
    return ws


def official_attention_module(u, conv0, conv0_1, conv0_2, conv1_1, conv1_2, conv2_1, conv2_2, conv3):
    """A line-by-line transcription of the official AttentionModule.forward (nn.Conv2d modules)."""
    u_copy = u.clone()
    attn = conv0(u)
    attn_0 = conv0_2(conv0_1(attn))
    attn_1 = conv1_2(conv1_1(attn))
    attn_2 = conv2_2(conv2_1(attn))
    attn = attn + attn_0 + attn_1 + attn_2
    attn = conv3(attn)
    return attn * u_copy


@pytest.mark.parametrize("shape", [(2, 8, 16, 16), (1, 3, 5, 23), (2, 1, 1, 1), (1, 4, 21, 2)])
def test_reference_matches_official_module(shape):
    torch.manual_seed(1)
    C = shape[1]
    m = sk.MSCA(C).double()
    for p in m.parameters():  # non-trivial biases too
        torch.nn.init.normal_(p, std=0.3)
    u = torch.randn(shape, dtype=torch.float64)
    expected = official_attention_module(u, m.conv0, m.conv0_1, m.conv0_2, m.conv1_1, m.conv1_2,
                                         m.conv2_1, m.conv2_2, m.conv3)
    with sk.use_backend("reference"):
        out = m(u)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sk.msca_ref(u, *m.weights()), expected, rtol=1e-12, atol=1e-12)


def test_reference_gradcheck():
    u = torch.randn(1, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    ws = random_weights(3, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: sk.msca_ref(*t), (u, *ws))


def test_module_parameter_names_and_shapes():
    m = sk.MSCA(16)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "conv0.weight": (16, 1, 5, 5), "conv0.bias": (16,),
        "conv0_1.weight": (16, 1, 1, 7), "conv0_1.bias": (16,),
        "conv0_2.weight": (16, 1, 7, 1), "conv0_2.bias": (16,),
        "conv1_1.weight": (16, 1, 1, 11), "conv1_1.bias": (16,),
        "conv1_2.weight": (16, 1, 11, 1), "conv1_2.bias": (16,),
        "conv2_1.weight": (16, 1, 1, 21), "conv2_1.bias": (16,),
        "conv2_2.weight": (16, 1, 21, 1), "conv2_2.bias": (16,),
        "conv3.weight": (16, 16, 1, 1), "conv3.bias": (16,),
    }


def test_official_state_dict_loads_unchanged():
    """A module built like the official one (plain nn.Conv2d attributes) loads into MSCA."""
    C = 6

    class Official(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv0 = torch.nn.Conv2d(C, C, 5, padding=2, groups=C)
            self.conv0_1 = torch.nn.Conv2d(C, C, (1, 7), padding=(0, 3), groups=C)
            self.conv0_2 = torch.nn.Conv2d(C, C, (7, 1), padding=(3, 0), groups=C)
            self.conv1_1 = torch.nn.Conv2d(C, C, (1, 11), padding=(0, 5), groups=C)
            self.conv1_2 = torch.nn.Conv2d(C, C, (11, 1), padding=(5, 0), groups=C)
            self.conv2_1 = torch.nn.Conv2d(C, C, (1, 21), padding=(0, 10), groups=C)
            self.conv2_2 = torch.nn.Conv2d(C, C, (21, 1), padding=(10, 0), groups=C)
            self.conv3 = torch.nn.Conv2d(C, C, 1)

        def forward(self, u):
            return official_attention_module(u, self.conv0, self.conv0_1, self.conv0_2, self.conv1_1,
                                             self.conv1_2, self.conv2_1, self.conv2_2, self.conv3)

    off = Official()
    ours = sk.MSCA(C)
    ours.load_state_dict(off.state_dict(), strict=True)
    u = torch.randn(2, C, 9, 7)
    with sk.use_backend("reference"):
        torch.testing.assert_close(ours(u), off(u))


# ---- bad input ------------------------------------------------------------------------------

def test_rejects_wrong_rank():
    with pytest.raises(ValueError, match="u must be a 4-D tensor"):
        sk.msca(torch.randn(3, 8, 8), *random_weights(3, torch.float32))


def test_rejects_channel_mismatch():
    with pytest.raises(ValueError, match=r"w0 must have shape \(4, 1, 5, 5\) for u with 4 channels"):
        sk.msca(torch.randn(1, 4, 8, 8), *random_weights(3, torch.float32))


def test_rejects_wrong_weight_count():
    with pytest.raises(ValueError, match="16 weight and bias tensors"):
        sk.msca(torch.randn(1, 3, 8, 8), *random_weights(3, torch.float32)[:15])


def test_rejects_mixed_dtypes():
    ws = random_weights(3, torch.float32)
    ws[5] = ws[5].double()
    with pytest.raises(TypeError, match="b0_2 has dtype torch.float64 but u has torch.float32"):
        sk.msca(torch.randn(1, 3, 8, 8), *ws)


def test_rejects_non_tensor_and_int_dtype():
    with pytest.raises(TypeError, match="u must be a torch.Tensor"):
        sk.msca([[1.0]], *random_weights(3, torch.float32))
    with pytest.raises(TypeError, match="u must be float32"):
        sk.msca(torch.ones(1, 3, 4, 4, dtype=torch.int64), *random_weights(3, torch.float32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
def test_rejects_mixed_devices():
    ws = random_weights(3, torch.float32)
    with pytest.raises(ValueError, match="on one device"):
        sk.msca(torch.randn(1, 3, 8, 8, device="cuda"), *[w.cuda() for w in ws[:-1]], ws[-1])


def test_rejects_mixed_devices_meta():
    """A second device without a GPU: the meta device."""
    ws = random_weights(3, torch.float32)
    ws[0] = ws[0].to("meta")
    with pytest.raises(ValueError, match="w0 is on meta but u is on cpu"):
        sk.msca(torch.randn(1, 3, 8, 8), *ws)


def test_module_rejects_bad_channels():
    with pytest.raises(ValueError, match="channels must be a positive int"):
        sk.MSCA(0)
    with pytest.raises(ValueError, match="channels must be a positive int"):
        sk.MSCA(True)
    import numpy as np
    assert sk.MSCA(np.int64(3)).channels == 3


def test_autocast_runs_in_autocast_dtype():
    m = sk.MSCA(4)
    u = torch.randn(1, 4, 6, 6)
    with sk.use_backend("reference"), torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(u)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), sk.msca_ref(u, *m.weights()), rtol=3e-2, atol=3e-2)
