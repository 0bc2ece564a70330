"""NMF2D reference: against the official algorithm (as tests/official_segnext.py transcribes it),
gradcheck in both gradient modes, module behaviour, reproducibility and input validation."""
import pytest
import torch

import segnext_kernels as sk
from official_segnext import NMF2D as OfficialNMF2D


def official_nmf2d(x, bases, S, steps):
    """mmseg's NMF2D as tests/official_segnext.py transcribes it (docs/nmf.md#algorithm), with the
    bases given instead of drawn."""
    nmf = OfficialNMF2D(S=S, R=bases.shape[-1], eval_steps=steps).eval()
    nmf._build_bases = lambda *args, **kwargs: bases
    return nmf(x)


@pytest.mark.parametrize("B,C,H,W,S,R,steps", [(2, 16, 5, 7, 1, 4, 6), (1, 12, 3, 3, 2, 5, 7),
                                               (2, 8, 1, 1, 1, 3, 1), (1, 6, 4, 4, 3, 2, 0)])
def test_matches_official_transcription(B, C, H, W, S, R, steps):
    x = torch.rand(B, C, H, W, dtype=torch.float64) * 3
    bases = sk.draw_bases(B * S, C // S, R, device="cpu", dtype=torch.float64)
    with sk.use_backend("reference"):
        out = sk.nmf2d(x, R=R, steps=steps, S=S, bases=bases)
    torch.testing.assert_close(out, official_nmf2d(x, bases, S, steps), rtol=1e-12, atol=1e-12)


def test_bases_are_normalised_columns():
    b = sk.draw_bases(3, 10, 4, device="cpu")
    assert b.min() >= 0
    torch.testing.assert_close(b.norm(dim=1), torch.ones(3, 4))


def test_gradcheck_unrolled():
    x = (torch.rand(1, 4, 3, 2, dtype=torch.float64) + 0.1).requires_grad_()
    bases = sk.draw_bases(2, 2, 2, device="cpu", dtype=torch.float64)
    fn = lambda x: sk.nmf2d(x, R=2, steps=2, S=2, bases=bases, grad="unrolled", backend="reference")
    assert torch.autograd.gradcheck(fn, (x,))


def test_one_step_gradient_is_that_of_the_last_update_with_frozen_state():
    """one_step differentiates g(x) = B* coef_update(x, B*, C*)ᵀ with the iterated bases B* and
    coef C* held constant (HamNet's one-step gradient): gradcheck g, then compare."""
    from segnext_kernels.nmf2d.reference import coef_update, nmf_iterate
    x = (torch.rand(1, 4, 3, 2, dtype=torch.float64) + 0.1).requires_grad_()
    bases = sk.draw_bases(1, 4, 2, device="cpu", dtype=torch.float64)
    with torch.no_grad():
        b_star, c_star = nmf_iterate(x.reshape(1, 4, 6), bases, 2, 1e-6, 1.0)

    def g(x):
        X = x.reshape(1, 4, 6)
        return torch.bmm(b_star, coef_update(X, b_star, c_star, 1e-6).transpose(1, 2)).reshape(x.shape)

    assert torch.autograd.gradcheck(g, (x,))
    w = torch.randn(1, 4, 3, 2, dtype=torch.float64)
    out = sk.nmf2d(x, R=2, steps=2, bases=bases, grad="one_step", backend="reference")
    torch.testing.assert_close(out, g(x))
    got, = torch.autograd.grad((out * w).sum(), x)
    want, = torch.autograd.grad((g(x) * w).sum(), x)
    torch.testing.assert_close(got, want)


def test_gradcheck_unrolled_wrt_bases():
    x = torch.rand(1, 4, 2, 3, dtype=torch.float64) + 0.1
    bases = sk.draw_bases(1, 4, 2, device="cpu", dtype=torch.float64).requires_grad_()
    fn = lambda b: sk.nmf2d(x, R=2, steps=2, bases=b, grad="unrolled", backend="reference")
    assert torch.autograd.gradcheck(fn, (bases,))


def test_one_step_forward_equals_unrolled_and_gradients_differ():
    x = (torch.rand(2, 8, 4, 4, dtype=torch.float64) + 0.1).requires_grad_()
    bases = sk.draw_bases(2, 8, 3, device="cpu", dtype=torch.float64)
    a = sk.nmf2d(x, R=3, steps=3, bases=bases, grad="unrolled", backend="reference")
    b = sk.nmf2d(x, R=3, steps=3, bases=bases, grad="one_step", backend="reference")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    ga, = torch.autograd.grad(a.sum(), x)
    gb, = torch.autograd.grad(b.sum(), x)
    assert not torch.allclose(ga, gb)  # one_step drops the path through the iterations


def test_generator_reproducible_and_fresh_bases_per_call():
    x = torch.rand(2, 8, 4, 4)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = sk.nmf2d(x, R=4, steps=2, generator=g1)
    b = sk.nmf2d(x, R=4, steps=2, generator=g2)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = sk.nmf2d(x, R=4, steps=2, generator=g1)  # next draw of the same generator
    assert not torch.equal(a, c)


def test_per_sample_bases():
    """Two identical samples in one batch get different bases (drawn per sample)."""
    x1 = torch.rand(1, 8, 4, 4)
    out = sk.nmf2d(torch.cat([x1, x1]), R=4, steps=1)
    assert not torch.equal(out[0], out[1])


def test_module_steps_follow_training_mode():
    x = torch.rand(1, 8, 3, 3, dtype=torch.float64)
    bases = sk.draw_bases(1, 8, 2, device="cpu", dtype=torch.float64)
    m = sk.NMF2D(R=2)
    assert m(x, bases=bases).shape == x.shape
    torch.testing.assert_close(m.train()(x, bases=bases), official_nmf2d(x, bases, 1, 6))
    torch.testing.assert_close(m.eval()(x, bases=bases), official_nmf2d(x, bases, 1, 7))
    assert len(m.state_dict()) == 0


def test_half_input_computes_in_float32():
    x = torch.rand(1, 8, 4, 4, dtype=torch.float16) * 50
    bases = sk.draw_bases(1, 8, 4, device="cpu")
    out = sk.nmf2d(x, R=4, steps=7, bases=bases)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    ref = official_nmf2d(x.double(), bases.double(), 1, 7)
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


def test_autocast_keeps_float32():
    x = torch.rand(1, 8, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sk.nmf2d(x, R=4, steps=2)
    assert out.dtype == torch.float32


# ---- bad input ------------------------------------------------------------------------------

def test_rejects_channels_not_divisible_by_S():
    with pytest.raises(ValueError, match="C=10 of x must be divisible by S=3"):
        sk.nmf2d(torch.rand(1, 10, 4, 4), R=2, steps=1, S=3)


def _with_value(t, value):
    t = t.clone()
    t.view(-1)[5] = value
    return t


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")], ids=["negative", "nan", "inf"])
def test_rejects_bad_values_when_checking_inputs(monkeypatch, value):
    """SEGNEXT_CHECK_INPUTS=1: x and given bases must be non-negative and finite."""
    monkeypatch.setenv("SEGNEXT_CHECK_INPUTS", "1")
    x = torch.rand(1, 8, 4, 4)
    with pytest.raises(ValueError, match="x must be non-negative and finite"):
        sk.nmf2d(_with_value(x, value), R=2, steps=1)
    bases = torch.rand(1, 8, 2)
    with pytest.raises(ValueError, match="bases must be non-negative and finite"):
        sk.nmf2d(x, R=2, steps=1, bases=_with_value(bases, value))
    sk.nmf2d(x, R=2, steps=1, bases=bases)  # good values pass


def test_values_are_not_checked_by_default(monkeypatch):
    """Without the debug flag no value is read back (no host sync): NaN in gives NaN out, as in
    mmseg's NMF2D, and negative input is decomposed without complaint."""
    monkeypatch.delenv("SEGNEXT_CHECK_INPUTS", raising=False)
    x = torch.rand(2, 8, 4, 4)
    x[1, 3, 1, 1] = float("nan")
    y = sk.nmf2d(x, R=2, steps=2, backend="reference")
    assert torch.isnan(y[1]).any() and torch.isfinite(y[0]).all()  # samples are independent
    assert torch.isfinite(sk.nmf2d(torch.randn(1, 8, 4, 4), R=2, steps=1)).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second generator device (CUDA)")
def test_rejects_generator_on_another_device():
    g = torch.Generator(device="cpu")
    with pytest.raises(ValueError, match="generator is on cpu but x is on cuda"):
        sk.nmf2d(torch.rand(1, 8, 4, 4, device="cuda"), R=2, steps=1, generator=g)


@pytest.mark.parametrize("kw,msg", [(dict(R=0), "R must be an int >= 1"),
                                    (dict(steps=-1), "steps must be an int >= 0"),
                                    (dict(eps=float("nan")), "eps must be a finite float > 0"),
                                    (dict(eps=0.0), "eps must be a finite float > 0"),
                                    (dict(inv_t=float("inf")), "inv_t must be a finite float"),
                                    (dict(grad="exact"), "grad must be one of")])
def test_rejects_bad_arguments(kw, msg):
    args = dict(R=2, steps=1)
    args.update(kw)
    with pytest.raises(ValueError, match=msg):
        sk.nmf2d(torch.rand(1, 8, 4, 4), **args)


def test_rejects_bad_bases_shape_and_rank():
    with pytest.raises(ValueError, match=r"bases must have shape \(B\*S, D, R\) = \(1, 8, 2\)"):
        sk.nmf2d(torch.rand(1, 8, 4, 4), R=2, steps=1, bases=torch.rand(1, 8, 3))
    with pytest.raises(ValueError, match="x must be a 4-D tensor"):
        sk.nmf2d(torch.rand(8, 4, 4), R=2, steps=1)
