"""patch()/unpatch() on models written independently of ours, with the official attribute names
(tests/official_segnext.py: the official SegNeXt restated without mmcv)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segnext_kernels as sk
# The official MSCA, MLP (both spellings) and mmseg NMF2D, written independently of segnext_kernels
from official_segnext import AttentionModule, DWConv, Mlp, NMF2D


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(nn.GELU(), AttentionModule(8))
        self.attn = nn.ModuleDict({"spatial_gating_unit": AttentionModule(8)})
        self.ham = NMF2D(R=4)
        self.not_msca = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        x = self.attn["spatial_gating_unit"](self.blocks(self.stem(x)))
        return self.ham(F.relu(x))


def test_patch_swaps_keeps_weights_and_matches():
    torch.manual_seed(0)
    net = Net().train()
    reference = copy.deepcopy(net)
    params_before = {n: p for n, p in net.named_parameters()}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    done = sk.patch(net)
    assert sorted((r.name, r.new) for r in done) == [("attn.spatial_gating_unit", "MSCA"),
                                                      ("blocks.1", "MSCA"), ("ham", "NMF2D")]
    assert isinstance(net.blocks[1], sk.MSCA) and isinstance(net.ham, sk.NMF2D)
    assert net.ham.R == 4 and net.ham.training and net.ham.inv_t == 1.0
    # same parameter objects, same names: the optimizer and state_dict are untouched
    assert {n: p for n, p in net.named_parameters()} == params_before
    assert net.state_dict().keys() == reference.state_dict().keys()

    x = torch.randn(2, 3, 9, 11)
    torch.manual_seed(5)
    want = reference(x)
    torch.manual_seed(5)
    got = net(x)  # the same random bases: ours draws them the same way
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    got.sum().backward()
    opt.step()  # optimizer built before patching updates the patched model's parameters
    assert not torch.equal(net.blocks[1].conv0.weight, reference.blocks[1].conv0.weight)


def test_patch_keeps_device_dtype_mode():
    net = Net().double().eval()
    sk.patch(net)
    m = net.blocks[1]
    assert not m.training and m.conv0.weight.dtype == torch.float64
    out = net(torch.randn(1, 3, 6, 6, dtype=torch.float64))
    assert out.dtype == torch.float64


def test_unpatch_restores_originals():
    net = Net()
    sk.patch(net)
    restored = sk.unpatch(net)
    assert len(restored) == 3
    assert type(net.blocks[1]) is AttentionModule and type(net.ham) is NMF2D
    assert sk.unpatch(net) == []


def test_non_matching_modules_are_left_alone():
    m = AttentionModule(4)
    m.conv2_1 = nn.Conv2d(4, 4, (1, 19), padding=(0, 9), groups=4)  # not the official kernel
    net = nn.Sequential(m, NMF2D(rand_init=False))
    assert sk.patch(net) == []


# --------------------------------------------------------------------------------------------
# The MSCAN MLP, written out independently in both official spellings (tests/official_segnext.py)
# --------------------------------------------------------------------------------------------
def _randomize(net):
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.3)


@pytest.mark.parametrize("plain_dwconv", [False, True])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_patch_mlp_matches_in_eval_and_training(plain_dwconv, layout):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 1), Mlp(6, 24, plain_dwconv=plain_dwconv))
    _randomize(net)
    reference = copy.deepcopy(net)
    params_before = {n: p for n, p in net.named_parameters()}
    done = sk.patch(net)
    assert [(r.name, r.original, r.new) for r in done] == [("1", "Mlp", "FusedMlp")]
    assert isinstance(net[1], sk.FusedMlp)
    assert {n: p for n, p in net.named_parameters()} == params_before
    assert net.state_dict().keys() == reference.state_dict().keys()

    x = torch.randn(2, 3, 7, 9).contiguous(memory_format=layout)
    for mode in ("eval", "train"):
        net.train(mode == "train")
        reference.train(mode == "train")
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        got, want = net(xa), reference(xb)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        got.square().sum().backward()
        want.square().sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-4)
        for (n, p), q in zip(net.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4, msg=n)
        net.zero_grad()
        reference.zero_grad()
    with torch.no_grad():
        net.eval()
        reference.eval()
        torch.testing.assert_close(net(x), reference(x), rtol=1e-4, atol=1e-4)


def test_patch_mlp_with_dropout_keeps_module_path_in_training():
    torch.manual_seed(0)
    net = nn.Sequential(Mlp(4, 8, drop=0.5))
    reference = copy.deepcopy(net)
    sk.patch(net)
    x = torch.randn(1, 4, 5, 5)
    torch.manual_seed(3)
    got = net(x)
    torch.manual_seed(3)
    want = reference(x)
    torch.testing.assert_close(got, want)  # the same dropout masks: same call sequence
    assert (got == 0).any()


def test_patch_leaves_non_mlps_and_ours_alone():
    import segnext
    m = Mlp(4, 8)
    m.act = nn.GELU(approximate="tanh")  # not the exact GELU the kernels compute
    wide = Mlp(4, 8)
    wide.dwconv = DWConv(8)
    wide.dwconv.dwconv = nn.Conv2d(8, 8, 5, padding=2, groups=8)  # not a 3x3
    model = segnext.segnext_t(num_classes=3)  # its own Mlp is already fused
    net = nn.Sequential(m, wide, model)
    assert [r for r in sk.patch(net) if r.new == "FusedMlp"] == []


def test_unpatch_restores_mlp():
    net = nn.Sequential(Mlp(4, 8))
    sk.patch(net)
    assert [r.new for r in sk.unpatch(net)] == ["Mlp"]
    assert type(net[0]) is Mlp


def test_patch_leaves_mlp_variants_with_more_state_alone():
    # An MLP-shaped module with an extra child or parameter may compute more than the
    # official one: it is left alone rather than silently losing that.
    extra_child = Mlp(4, 8)
    extra_child.norm = nn.BatchNorm2d(8)
    extra_param = Mlp(4, 8)
    extra_param.gamma = nn.Parameter(torch.ones(4))
    wrapper = Mlp(4, 8)
    wrapper.dwconv.scale = nn.Parameter(torch.ones(1))
    net = nn.Sequential(extra_child, extra_param, wrapper)
    assert sk.patch(net) == []


# ---------------------------------------------------------------------------------------------
# The drop-in claim on a whole model written as the official code writes it
# (tests/official_segnext.py): patch() keeps its outputs and its training steps.

def _official_pair(train):
    from official_segnext import OfficialSegNeXt
    torch.manual_seed(0)
    official = OfficialSegNeXt("t", num_classes=5).train(train)
    patched = copy.deepcopy(official)
    replaced = sk.patch(patched)
    return official, patched, replaced


def test_patch_official_segnext_replaces_every_msca_mlp_and_nmf():
    official, patched, replaced = _official_pair(train=False)
    kinds = [r.new for r in replaced]
    img = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), sk.record_kernels() as ran:
        patched.eval()(img)
    if sk.available_backends()["cpu"].available:  # the swapped modules run the fused kernels
        assert ran[("msca", "cpu")] == 13 and ("msca", "reference") not in ran
        assert ran[("mlp", "cpu")] + ran[("dwconv_gelu", "cpu")] == 13
    assert sum(n for (op, _), n in ran.items() if op == "nmf2d") == 1  # through our NMF2D op
    with torch.no_grad(), sk.record_kernels() as ran:
        official.eval()(img)
    assert not ran  # the unpatched official model runs none of our ops
    # SegNeXt-T: 3 + 3 + 5 + 2 blocks, each with one MSCA and one MLP; one NMF2D in the head
    assert kinds.count("MSCA") == 13 and kinds.count("FusedMlp") == 13
    assert kinds.count("NMF2D") == 1 and len(kinds) == 27
    assert not any(type(m).__name__ == "AttentionModule" for m in patched.modules())
    sk.unpatch(patched)
    assert sum(type(m).__name__ == "AttentionModule" for m in patched.modules()) == 13


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_patched_official_segnext_infers_and_trains_as_before(layout):
    official, patched, _ = _official_pair(train=True)
    official = official.to(memory_format=layout)
    patched = patched.to(memory_format=layout)
    torch.manual_seed(1)
    batches = [(torch.randn(2, 3, 64, 64).contiguous(memory_format=layout),
                torch.randint(0, 5, (2, 64, 64))) for _ in range(3)]
    # inference (eval mode, the same NMF bases), before any training
    with torch.no_grad():
        official.eval()
        patched.eval()
        torch.manual_seed(7)
        want = official(batches[0][0])
        torch.manual_seed(7)
        got = patched(batches[0][0])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    official.train()
    patched.train()
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (official, patched)]
    losses, first_grads = ([], []), ({}, {})
    for step, (img, labels) in enumerate(batches):
        for which, (model, opt) in enumerate(zip((official, patched), opts)):
            torch.manual_seed(100 + step)  # same NMF bases, dropout and drop-path draws
            logits = F.interpolate(model(img), size=img.shape[-2:], mode="bilinear",
                                   align_corners=False)
            loss = F.cross_entropy(logits, labels)
            opt.zero_grad()
            loss.backward()
            if step == 0:
                first_grads[which].update({n: p.grad.clone() for n, p in model.named_parameters()})
            opt.step()
            losses[which].append(loss.item())
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]),
                               rtol=1e-4, atol=1e-6)
    # Gradients of the first step, every parameter. (Later weights are not compared: AdamW
    # normalises a gradient that is pure rounding noise, e.g. a conv bias followed by BN, to a
    # full-size step, so equal models drift apart in such parameters without any error.)
    scale = max(g.abs().max().item() for g in first_grads[0].values())
    assert first_grads[0].keys() == first_grads[1].keys()
    for name, want in first_grads[0].items():
        torch.testing.assert_close(first_grads[1][name], want, rtol=1e-3, atol=1e-5 * scale,
                                   msg=name)
