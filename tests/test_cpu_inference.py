"""The CPU inference path around the kernels: packed weights cached between calls (and
invalidated by any in-place write or a new tensor); the model's eval-time folding (patch-embed norms, the head's
per-stage squeeze, the fused 1x1 convs) against the reference backend, in both layouts and in
bfloat16.
"""
import gc

import pytest
import torch

import segnext_kernels as sk
from segnext_kernels.mlp import mlp_ref
from utils import FORMATS, rel_err

pytestmark = pytest.mark.skipif("cpu" not in sk.op_backends().get("mlp", ()),
                                reason="segnext_kernels._C has no CPU kernels: "
                                       + sk.available_backends()["cpu"].reason)


def mlp_weights(C, hidden, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(hidden, C, 1, 1), (hidden,), (hidden, 1, 3, 3), (hidden,), (C, hidden, 1, 1), (C,)]
    return [torch.randn(s, generator=gen) * 0.3 for s in shapes]


def test_packed_weights_follow_in_place_writes_and_new_tensors():
    C, hidden = 24, 72
    ws = mlp_weights(C, hidden)
    x = torch.randn(1, C, 7, 9).contiguous(memory_format=torch.channels_last)
    ref = lambda: mlp_ref(x.double(), *[w.double() for w in ws])  # noqa: E731
    y0 = torch.ops.segnext_C.mlp_forward(x, ws)
    assert rel_err(y0, ref()) <= 1e-5
    # In place (the version counter moves): both packed weights are repacked.
    ws[0].mul_(-1.5)
    ws[4][3].add_(0.7)  # through a view
    y1 = torch.ops.segnext_C.mlp_forward(x, ws)
    assert rel_err(y1, ref()) <= 1e-5 and not torch.allclose(y0, y1)
    # A freed weight's entry is never matched by a new tensor, even at the same address.
    for _ in range(5):
        ws[0] = torch.randn_like(ws[0])
        ws[4] = torch.randn_like(ws[4]) * 0.1
        gc.collect()
        assert rel_err(torch.ops.segnext_C.mlp_forward(x, ws), ref()) <= 1e-5
    # Inference tensors (no version counter) are packed on every call.
    with torch.inference_mode():
        wi = [w.clone() for w in ws]
        yi = torch.ops.segnext_C.mlp_forward(x, wi)
        wi[0].mul_(2.0)
        yj = torch.ops.segnext_C.mlp_forward(x, wi)
    assert rel_err(yi, ref()) <= 1e-5
    assert rel_err(yj, mlp_ref(x.double(), *[w.double() for w in wi])) <= 1e-5


# ------------------------------------------------------------------------ the folded model


def _randomise_norms(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm, torch.nn.LayerNorm)):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def tiny_t():
    import segnext
    torch.manual_seed(0)
    return _randomise_norms(segnext.segnext_t(num_classes=19)).eval()


def _bn_calls(model):
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for n, m in model.named_modules()
             if "patch_embed" in n and isinstance(m, torch.nn.BatchNorm2d)]
    return calls, hooks


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_folded_model_matches_the_reference(tiny_t, fmt):
    model = tiny_t.to(memory_format=FORMATS[fmt])
    img = torch.randn(1, 3, 72, 104).contiguous(memory_format=FORMATS[fmt])
    bases = sk.draw_bases(1, 256, 16, device="cpu")
    calls, hooks = _bn_calls(model)
    try:
        with torch.no_grad():
            with sk.record_kernels() as ran:
                got = model(img, bases=bases)
            folded_bn_calls = len(calls)
            with sk.use_backend("reference"):
                want = model(img, bases=bases)
    finally:
        for h in hooks:
            h.remove()
    assert rel_err(got, want.double()) <= 1e-4
    assert ran[("msca", "cpu")] == 13 and ran[("nmf2d", "cpu")] == 1
    if fmt == "nhwc":
        # every block's proj_1 and proj_2; the head's three squeeze slices, ham_in, ham_out,
        # align and conv_seg; the patch-embed norms folded into their convs
        assert ran[("conv1x1", "cpu")] == 2 * 13 + 7
        assert folded_bn_calls == 0
    else:  # NCHW: the fused 1x1 convs are not faster there, nothing is folded but the blocks
        assert ("conv1x1", "cpu") not in ran and folded_bn_calls == 5
    assert len(calls) == folded_bn_calls + 5  # the reference ran the norms


def test_training_and_gradients_run_the_model_as_written(tiny_t):
    model = tiny_t.to(memory_format=torch.channels_last)
    img = torch.randn(1, 3, 40, 56).contiguous(memory_format=torch.channels_last)
    calls, hooks = _bn_calls(model)
    try:
        with sk.record_kernels() as ran:
            model(img).sum().backward()  # eval mode, but a gradient
        assert len(calls) == 5 and ("conv1x1", "cpu") not in ran
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)


def test_squeeze_split_equals_the_concatenation():
    # The head's squeeze conv run per stage before the resize is the conv of the concatenated
    # resized stages (float64: up to rounding).
    import segnext
    torch.manual_seed(1)
    head = _randomise_norms(segnext.segnext_t(num_classes=5)).decode_head.double().eval()
    feats = [None] + [torch.rand(1, c, s, s + 3, dtype=torch.float64)
                      for c, s in zip((64, 160, 256), (12, 6, 3))]
    inputs = [feats[i] for i in head.in_index]
    size = inputs[0].shape[2:]
    with torch.no_grad():
        want = head.squeeze(torch.cat([head._resize(x, size) for x in inputs], dim=1))
        got = head._squeeze_fused(inputs)
    assert rel_err(got, want) <= 1e-12


def test_bfloat16_model_runs_the_fused_kernels_and_agrees_with_float32(tiny_t):
    # The same weights in bfloat16: our kernels' error against the float32 model is no worse
    # than eager PyTorch's own bfloat16 error.
    import copy
    model = tiny_t.to(memory_format=torch.channels_last)
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    img = torch.randn(1, 3, 96, 128).contiguous(memory_format=torch.channels_last)
    bases = sk.draw_bases(1, 256, 16, device="cpu")
    with torch.no_grad():
        want = model(img, bases=bases)
        with sk.record_kernels() as ran:
            got = model16(img.to(torch.bfloat16), bases=bases)
        with sk.use_backend("reference"):
            eager16 = model16(img.to(torch.bfloat16), bases=bases)
    assert got.dtype == torch.bfloat16
    assert ran[("msca", "cpu")] == 13 and ran[("conv1x1", "cpu")] == 33
    assert ran[("nmf2d", "cpu")] == 1
    err, eager_err = rel_err(got, want.double()), rel_err(eager16, want.double())
    assert err <= max(1.5 * eager_err, 1e-2), (err, eager_err)
    agree = (got.float().argmax(1) == want.argmax(1)).float().mean().item()
    eager_agree = (eager16.float().argmax(1) == want.argmax(1)).float().mean().item()
    assert agree >= eager_agree - 0.02, (agree, eager_agree)
