"""The thin SegNeXt model: sizes, official key names, forward shapes, checkpoints, param groups.

Parameter counts are taken on the meta device, so B and L cost no memory or init time; every
forward runs SegNeXt-T at a small input.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segnext
import segnext_kernels as sk
from segnext_kernels import msca_ref, nmf_decompose_ref

# docs/model.md#parameter-counts / paper: (paper total, analytic total, analytic backbone), in millions, 150 classes.
PARAM_COUNTS = {
    "t": (4.26, 4.263, 3.904),
    "s": (13.93, 13.933, 13.450),
    "b": (27.64, 27.636, 26.278),
    "l": (48.93, 48.927, 44.637),
}

T_DIMS = (32, 64, 160, 256)
T_DEPTHS = (3, 3, 5, 2)
T_HIDDEN = (256, 512, 640, 1024)
BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def official_tiny_keys():
    """The key -> shape table of docs/model.md#segnext-t-key-table for SegNeXt-T, 150 classes."""
    keys = {}

    def bn(prefix, c):
        for s in BN_SUFFIXES:
            keys[f"{prefix}.{s}"] = () if s == "num_batches_tracked" else (c,)

    def conv(prefix, shape, bias=True):
        keys[f"{prefix}.weight"] = shape
        if bias:
            keys[f"{prefix}.bias"] = (shape[0],)

    b = "backbone"
    conv(f"{b}.patch_embed1.proj.0", (16, 3, 3, 3))
    bn(f"{b}.patch_embed1.proj.1", 16)
    conv(f"{b}.patch_embed1.proj.3", (32, 16, 3, 3))
    bn(f"{b}.patch_embed1.proj.4", 32)
    for i in range(1, 4):
        conv(f"{b}.patch_embed{i + 1}.proj", (T_DIMS[i], T_DIMS[i - 1], 3, 3))
        bn(f"{b}.patch_embed{i + 1}.norm", T_DIMS[i])
    for i, (c, h, depth) in enumerate(zip(T_DIMS, T_HIDDEN, T_DEPTHS), start=1):
        for j in range(depth):
            p = f"{b}.block{i}.{j}"
            keys[f"{p}.layer_scale_1"] = (c,)
            keys[f"{p}.layer_scale_2"] = (c,)
            bn(f"{p}.norm1", c)
            bn(f"{p}.norm2", c)
            conv(f"{p}.attn.proj_1", (c, c, 1, 1))
            sgu = f"{p}.attn.spatial_gating_unit"
            conv(f"{sgu}.conv0", (c, 1, 5, 5))
            for n, k in (("0", 7), ("1", 11), ("2", 21)):
                conv(f"{sgu}.conv{n}_1", (c, 1, 1, k))
                conv(f"{sgu}.conv{n}_2", (c, 1, k, 1))
            conv(f"{sgu}.conv3", (c, c, 1, 1))
            conv(f"{p}.attn.proj_2", (c, c, 1, 1))
            conv(f"{p}.mlp.fc1", (h, c, 1, 1))
            conv(f"{p}.mlp.dwconv.dwconv", (h, 1, 3, 3))
            conv(f"{p}.mlp.fc2", (c, h, 1, 1))
        keys[f"{b}.norm{i}.weight"] = (c,)
        keys[f"{b}.norm{i}.bias"] = (c,)
    d = "decode_head"
    conv(f"{d}.squeeze.conv", (256, 480, 1, 1), bias=False)
    keys[f"{d}.squeeze.gn.weight"] = keys[f"{d}.squeeze.gn.bias"] = (256,)
    conv(f"{d}.hamburger.ham_in.conv", (256, 256, 1, 1))
    conv(f"{d}.hamburger.ham_out.conv", (256, 256, 1, 1), bias=False)
    keys[f"{d}.hamburger.ham_out.gn.weight"] = keys[f"{d}.hamburger.ham_out.gn.bias"] = (256,)
    conv(f"{d}.align.conv", (256, 256, 1, 1), bias=False)
    keys[f"{d}.align.gn.weight"] = keys[f"{d}.align.gn.bias"] = (256,)
    conv(f"{d}.conv_seg", (150, 256, 1, 1))
    return keys


HAS_CPU_KERNELS = sk.available_backends()["cpu"].available and "cpu" in sk.op_backends()["msca"]

@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The inputs here are tiny: intra-op threads gain nothing, and on a shared, busy machine
    their spin-waiting made this file 5-8x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def trained_tiny():
    """A SegNeXt-T in eval mode whose every entry differs from a fresh one's, as after training."""
    torch.manual_seed(1)
    model = segnext.segnext_t()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(1000)
    return model.eval()


@pytest.fixture(scope="module")
def image():
    return torch.randn(2, 3, 64, 64, generator=seeded(123))


@pytest.fixture(scope="module")
def trained_logits(trained_tiny, image):
    return logits_of(trained_tiny, image)


def logits_of(model, img):
    with torch.no_grad():
        return model(img, generator=seeded(7))


# ---------------------------------------------------------------------------------- sizes

@pytest.mark.parametrize("size", "tsbl")
def test_parameter_counts(size):
    paper, analytic, analytic_backbone = PARAM_COUNTS[size]
    with torch.device("meta"):
        model = segnext.build(size, num_classes=150)
    total = sum(p.numel() for p in model.parameters()) / 1e6
    backbone = sum(p.numel() for p in model.backbone.parameters()) / 1e6
    assert abs(total - paper) <= 0.005 * paper, total
    assert abs(total - analytic) <= 0.001 * analytic, total
    assert abs(backbone - analytic_backbone) <= 0.001 * analytic_backbone, backbone


def test_size_settings():
    assert segnext.MSCAN_SETTINGS["l"]["depths"] == (3, 5, 27, 3)
    with torch.device("meta"):
        b, t = segnext.segnext_b(), segnext.segnext_t(num_classes=19)
    assert b.decode_head.hamburger.ham.R == 64 and t.decode_head.hamburger.ham.R == 16
    assert t.decode_head.conv_seg.out_channels == 19
    assert [len(getattr(b.backbone, f"block{i}")) for i in range(1, 5)] == [3, 3, 12, 3]
    assert b.backbone.block3[0].mlp.fc1.out_channels == 4 * 320  # mlp_ratios [8, 8, 4, 4]
    assert b.backbone.block1[0].mlp.fc1.out_channels == 8 * 64
    # Stochastic depth: a linear ramp from 0 (Identity) to drop_path_rate over all blocks.
    assert isinstance(b.backbone.block1[0].drop_path, nn.Identity)
    assert math.isclose(b.backbone.block4[2].drop_path.drop_prob, 0.1, rel_tol=1e-6)
    with pytest.raises(ValueError, match="size"):
        segnext.build("xl")


# ---------------------------------------------------------------------------------- keys

def test_tiny_state_dict_matches_official_keys():
    sd = segnext.segnext_t().state_dict()
    expected = official_tiny_keys()
    assert len(sd) == 550
    assert sum(k.startswith("backbone.") for k in sd) == 537
    assert sum(k.startswith("decode_head.") for k in sd) == 13
    assert sorted(set(sd) - set(expected)) == [] and sorted(set(expected) - set(sd)) == []
    wrong = {k: (tuple(v.shape), expected[k])
             for k, v in sd.items() if tuple(v.shape) != expected[k]}
    assert wrong == {}
    assert sd["backbone.block1.0.norm1.num_batches_tracked"].dtype == torch.int64
    assert segnext.key_family(sd) == "original"


def test_sync_batchnorm_has_the_same_keys():
    model = segnext.segnext_t(norm_layer=nn.SyncBatchNorm)
    assert isinstance(model.backbone.patch_embed2.norm, nn.SyncBatchNorm)
    assert set(model.state_dict()) == set(official_tiny_keys())


def test_initialisation():
    model = segnext.segnext_t()
    blk = model.backbone.block2[1]
    assert torch.all(blk.layer_scale_1 == 0.01) and torch.all(blk.layer_scale_2 == 0.01)
    assert torch.all(model.backbone.norm3.weight == 1) and torch.all(model.backbone.norm3.bias == 0)
    fc1 = blk.mlp.fc1  # normal(0, sqrt(2 / fan_out)), fan_out = 1 * 1 * 512
    assert torch.all(fc1.bias == 0)
    assert abs(fc1.weight.std().item() - math.sqrt(2 / 512)) < 0.1 * math.sqrt(2 / 512)
    head = model.decode_head
    assert abs(head.conv_seg.weight.std().item() - 0.01) < 0.001
    assert torch.all(head.align.gn.weight == 1) and head.align.conv.bias is None
    assert head.hamburger.ham_in.conv.bias is not None and head.hamburger.ham_in.gn is None


# ---------------------------------------------------------------------------------- forward

def test_block_matches_the_official_formula():
    """x + γ1·(proj_2(MSCA(GELU(proj_1(n)))) + n), n = BN1(x); then x + γ2·MLP(BN2(x))."""
    block = segnext.Block(32, 8, nn.BatchNorm2d).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(0.2 * torch.randn_like(p))
    x = torch.randn(2, 32, 9, 7)
    a = block.attn
    n = block.norm1(x)
    u = F.gelu(a.proj_1(n))
    sgu = a.spatial_gating_unit
    attn = a.proj_2(msca_ref(u, *sgu.weights())) + n
    y = x + block.layer_scale_1[:, None, None] * attn
    m = block.mlp
    mlp = m.fc2(F.gelu(m.dwconv.dwconv(m.fc1(block.norm2(y)))))
    y = y + block.layer_scale_2[:, None, None] * mlp
    torch.testing.assert_close(block(x), y, rtol=1e-4, atol=1e-5)


def test_hamburger_matches_the_official_formula():
    ham = segnext.Hamburger(64, R=8).eval()
    x = torch.rand(2, 64, 5, 6)
    bases = F.normalize(torch.rand(2, 64, 8), dim=1)
    enjoy = F.relu(ham.ham_in(x)).reshape(2, 64, 30)
    enjoy = nmf_decompose_ref(enjoy, bases, steps=7).reshape(2, 64, 5, 6)
    expected = F.relu(x + ham.ham_out(enjoy))
    torch.testing.assert_close(ham(x, bases=bases), expected, rtol=1e-4, atol=1e-5)


def test_forward_shapes(trained_tiny, image):
    feats = trained_tiny.backbone(image)
    assert [tuple(f.shape) for f in feats] == [(2, 32, 16, 16), (2, 64, 8, 8),
                                               (2, 160, 4, 4), (2, 256, 2, 2)]
    logits = logits_of(trained_tiny, image)
    assert logits.shape == (2, 150, 8, 8) and torch.isfinite(logits).all()
    up = segnext.upsample_logits(logits, image.shape[-2:])
    assert up.shape == (2, 150, 64, 64)
    torch.testing.assert_close(up, F.interpolate(logits, size=(64, 64), mode="bilinear",
                                                 align_corners=False))
    torch.testing.assert_close(trained_tiny.predict(image, generator=seeded(7)), up)


def test_odd_input_size(trained_tiny):
    img = torch.randn(1, 3, 70, 50)
    logits = logits_of(trained_tiny, img)
    assert logits.shape == (1, 150, 9, 7) and torch.isfinite(logits).all()
    assert trained_tiny.predict(img).shape == (1, 150, 70, 50)


def test_channels_last_keeps_its_layout_and_logits(trained_logits, trained_tiny, image):
    model = segnext.segnext_t().eval()
    model.load_state_dict(trained_tiny.state_dict())
    model = model.to(memory_format=torch.channels_last)
    img = image.to(memory_format=torch.channels_last)
    with torch.no_grad():
        feats = model.backbone(img)
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f in feats)
    torch.testing.assert_close(logits_of(model, img), trained_logits, rtol=1e-4, atol=1e-4)


def test_nmf_generator_makes_eval_reproducible(trained_tiny, trained_logits, image):
    torch.testing.assert_close(logits_of(trained_tiny, image), trained_logits, rtol=0, atol=0)


def test_training_step_reaches_every_parameter():
    model = segnext.segnext_t(num_classes=5).train()
    with sk.record_kernels() as ran:
        logits = model(torch.randn(2, 3, 32, 32))
        target = torch.randint(0, 5, (2, 32, 32))
        F.cross_entropy(segnext.upsample_logits(logits, (32, 32)), target).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert no_grad == []
    if HAS_CPU_KERNELS:  # 13 blocks: the fused MSCA forward and backward in each
        assert ran[("msca", "cpu")] == 13 and ran[("msca_backward", "cpu")] == 13
        # the MLPs' dwconv + GELU on maps of 8x8 and less: the reference is faster there
        # (kernels.py); tests/test_dispatch.py covers where the fused one is taken
        assert ran[("dwconv_gelu", "reference")] == 13 and ("dwconv_gelu", "cpu") not in ran


@pytest.mark.skipif(not HAS_CPU_KERNELS, reason="segnext_kernels._C is not built")
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_inference_runs_the_fused_kernels(trained_tiny, image, layout):
    img = image.contiguous(memory_format=layout)
    with sk.record_kernels() as ran:
        logits_of(trained_tiny, img)
    assert ran[("msca", "cpu")] == 13 and ("msca", "reference") not in ran
    # each MLP: one fused op, or fc1 -> fused dwconv_gelu -> fc2 where that is faster
    assert ran[("mlp", "cpu")] + ran[("dwconv_gelu", "cpu")] == 13
    with sk.use_backend("reference"), sk.record_kernels() as ran:
        logits_of(trained_tiny, img)
    assert set(ran) == {("msca", "reference"), ("dwconv_gelu", "reference"), ("nmf2d", "reference")}


# ---------------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("family", ["original", "mmseg"])
def test_checkpoint_round_trip(trained_tiny, trained_logits, image, tmp_path, family):
    sd = segnext.convert_state_dict(trained_tiny.state_dict(), family)
    assert segnext.key_family(sd) == family
    dw = "backbone.block1.0.mlp.dwconv." + ("dwconv.weight" if family == "original" else "weight")
    assert dw in sd
    path = tmp_path / f"segnext_t_{family}.pth"
    torch.save(sd, path)
    fresh = segnext.segnext_t().eval()
    assert not torch.allclose(logits_of(fresh, image), trained_logits)
    result = segnext.load_checkpoint(fresh, path)
    assert result.ok and result.target == "model" and result.key_family == family
    torch.testing.assert_close(logits_of(fresh, image), trained_logits)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, trained_tiny.state_dict()[k]), k


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "module"])
def test_checkpoint_wrappers(trained_tiny, trained_logits, image, tmp_path, wrapper):
    sd = segnext.convert_state_dict(trained_tiny.state_dict(), "mmseg")
    if wrapper == "module":  # saved from inside DistributedDataParallel
        ckpt = {f"module.{k}": v for k, v in sd.items()}
    else:
        ckpt = {wrapper: sd, "meta": {"mmseg_version": "0.24.1", "iter": 160000}}
    torch.save(ckpt, tmp_path / "ckpt.pth")
    fresh = segnext.segnext_t().eval()
    assert segnext.load_checkpoint(fresh, tmp_path / "ckpt.pth").ok
    torch.testing.assert_close(logits_of(fresh, image), trained_logits)


def test_backbone_only_checkpoint(trained_tiny):
    backbone_sd = segnext.convert_state_dict(trained_tiny.backbone.state_dict(), "mmseg")
    assert not any(k.startswith("backbone.") for k in backbone_sd)
    fresh = segnext.segnext_t()
    head_before = {k: v.clone() for k, v in fresh.decode_head.state_dict().items()}
    result = segnext.load_checkpoint(fresh, {"state_dict": backbone_sd})
    assert result.ok and result.target == "backbone" and result.missing_keys == []
    for k, v in fresh.backbone.state_dict().items():
        assert torch.equal(v, trained_tiny.backbone.state_dict()[k]), k
    for k, v in fresh.decode_head.state_dict().items():
        assert torch.equal(v, head_before[k]), k
    # Strict on the backbone: a backbone entry missing from an ImageNet checkpoint is an error.
    del backbone_sd["norm4.weight"]
    with pytest.raises(segnext.CheckpointMismatchError, match=r"norm4\.weight"):
        segnext.load_checkpoint(segnext.segnext_t(), backbone_sd)


def test_full_checkpoint_into_bare_backbone(trained_tiny):
    backbone = segnext.mscan("t")
    result = segnext.load_checkpoint(backbone, trained_tiny.state_dict())
    assert result.ok and len(result.ignored_keys) == 13
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, trained_tiny.backbone.state_dict()[k]), k


def test_strict_mismatch_raises_with_key_names(trained_tiny):
    sd = dict(trained_tiny.state_dict())
    del sd["backbone.block3.4.attn.spatial_gating_unit.conv2_1.weight"]
    sd["decode_head.auxiliary.weight"] = torch.zeros(3)
    fresh = segnext.segnext_t(num_classes=19)  # conv_seg: [19, 256, 1, 1] vs 150 in the file
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(segnext.CheckpointMismatchError) as info:
        segnext.load_checkpoint(fresh, sd)
    msg = str(info.value)
    for name in ("backbone.block3.4.attn.spatial_gating_unit.conv2_1.weight",
                 "decode_head.auxiliary.weight", "decode_head.conv_seg.weight",
                 "decode_head.conv_seg.bias"):
        assert name in msg
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())  # untouched

    result = segnext.load_checkpoint(fresh, sd, strict=False)
    assert result.missing_keys == ["backbone.block3.4.attn.spatial_gating_unit.conv2_1.weight"]
    assert result.unexpected_keys == ["decode_head.auxiliary.weight"]
    assert [k for k, _, _ in result.mismatched_keys] == ["decode_head.conv_seg.weight",
                                                          "decode_head.conv_seg.bias"]
    assert result.mismatched_keys[0][1:] == ((150, 256, 1, 1), (19, 256, 1, 1))
    got = fresh.state_dict()
    assert torch.equal(got["backbone.norm1.weight"], sd["backbone.norm1.weight"])
    assert torch.equal(got["decode_head.conv_seg.bias"], before["decode_head.conv_seg.bias"])


class _NotATensor:
    pass


def test_weights_only_refusal_is_explained(trained_tiny, tmp_path):
    path = tmp_path / "with_objects.pth"
    torch.save({"state_dict": trained_tiny.state_dict(), "meta": {"hook": _NotATensor()}}, path)
    with pytest.raises(ValueError, match="weights_only=False"):
        segnext.load_checkpoint(segnext.segnext_t(), path)
    assert segnext.load_checkpoint(segnext.segnext_t(), path, weights_only=False).ok


def test_build_with_checkpoint(trained_tiny, trained_logits, image):
    model = segnext.build("tiny", checkpoint=trained_tiny.state_dict()).eval()
    torch.testing.assert_close(logits_of(model, image), trained_logits)


# ---------------------------------------------------------------------------------- optimizer

def test_param_groups_follow_the_official_rules():
    model = segnext.segnext_t()
    groups = segnext.param_groups(model, lr=6e-5, weight_decay=0.01)
    setting = {n: (g["lr"], g["weight_decay"]) for g in groups for n in g["param_names"]}
    assert set(setting) == {n for n, _ in model.named_parameters()}
    assert sum(len(g["params"]) for g in groups) == len(setting)
    for name, (lr, wd) in setting.items():
        if name.startswith("decode_head."):
            assert (lr, wd) == pytest.approx((6e-4, 0.01)), name  # head GN is "gn": keeps decay
        elif "norm" in name:
            assert (lr, wd) == pytest.approx((6e-5, 0.0)), name
        else:
            assert (lr, wd) == pytest.approx((6e-5, 0.01)), name
    zero_decay = {n for n, (_, wd) in setting.items() if wd == 0}
    assert {"backbone.block1.0.norm1.weight", "backbone.patch_embed2.norm.bias",
            "backbone.norm4.weight"} <= zero_decay
    for kept in ("backbone.patch_embed1.proj.1.weight", "backbone.patch_embed1.proj.4.bias",
                 "backbone.block2.1.layer_scale_1", "backbone.block1.0.attn.proj_1.bias"):
        assert setting[kept] == pytest.approx((6e-5, 0.01)), kept
    assert setting["decode_head.squeeze.gn.weight"] == pytest.approx((6e-4, 0.01))
    optimizer = torch.optim.AdamW(groups, lr=6e-5)
    assert len(optimizer.param_groups) == 3
