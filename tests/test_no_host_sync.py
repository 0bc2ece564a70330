"""No op reads tensor values back to the host on its forward or backward path.

On a GPU such a read (``.item()``, ``bool(t)``, ``.tolist()``, ``nonzero``, a data-dependent shape,
a device-to-host copy) waits for the device on every call. Three guards:

- ``no_host_sync()`` runs forward + backward of every op on every backend available here
  (reference, cpu, triton under the interpreter; cuda and triton on a GPU) and raises on any such
  read: a TorchDispatchMode sees every aten op, also those issued from C++ and from autograd's
  backward; ``tolist``/``numpy`` (which read memory without an aten op) are patched.
- The functional wrappers trace under ``torch.compile(fullgraph=True)`` (a value read is a graph
  break there).
- A scan of segnext_kernels/ for the Python spellings of value reads, with the few legitimate
  ones listed.

Checks of Python scalars and of shapes are fine; only tensor values count. Value checks of inputs
live behind SEGNEXT_CHECK_INPUTS=1 (segnext_kernels/_env.py).
"""
from __future__ import annotations

import contextlib
import pathlib
import re
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import segnext_kernels as sk
from segnext_kernels import _env
from segnext_kernels._strip_conv import strip_conv
from segnext_kernels.msca.reference import weight_shapes

aten = torch.ops.aten
ROOT = pathlib.Path(__file__).resolve().parents[1]


class HostSync(AssertionError):
    pass


def _overloads(*names):
    out = set()
    for name in names:
        packet = getattr(aten, name, None)
        if packet is not None:
            out.update(getattr(packet, o) for o in packet.overloads())
    return out


# aten ops whose result is a host value or whose output shape depends on tensor values
SYNC_OPS = _overloads("_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select",
                      "_unique", "_unique2", "unique_dim", "unique_consecutive", "bincount",
                      "repeat_interleave", "allclose", "_assert_async")


MASK_INDEX_OPS = _overloads("index", "index_put", "index_put_", "_index_put_impl_")


def _from_triton_interpreter() -> bool:
    """Under TRITON_INTERPRET=1 the interpreter moves kernel arguments through numpy: a test
    artefact (a compiled Triton launch reads nothing back)."""
    if not _env.triton_interpret():
        return False
    f = sys._getframe(2)
    for _ in range(40):
        if f is None:
            return False
        if f.f_globals.get("__name__", "").startswith("triton"):
            return True
        f = f.f_back
    return False


class _NoSyncMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNC_OPS and not _from_triton_interpreter():
            raise HostSync(f"{func} reads tensor values on the host")
        if func in MASK_INDEX_OPS and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                                          for i in args[1]):
            raise HostSync(f"{func} with a boolean mask: the output shape depends on tensor values")
        if func in (aten._to_copy.default, aten.copy_.default) and not _from_triton_interpreter():
            src = args[1] if func is aten.copy_.default else args[0]
            dst_cpu = (args[0].device.type == "cpu" if func is aten.copy_.default
                       else kwargs.get("device", src.device).type == "cpu")
            if isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst_cpu:
                raise HostSync(f"{func}: device-to-host copy")
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_sync():
    patched = {}

    def guard(name):
        original = getattr(torch.Tensor, name)

        def raiser(self, *a, **k):
            if not _from_triton_interpreter():
                raise HostSync(f"Tensor.{name} reads tensor values on the host")
            return original(self, *a, **k)
        patched[name] = original
        setattr(torch.Tensor, name, raiser)

    try:
        for name in ("tolist", "numpy", "__array__"):
            guard(name)
        with _NoSyncMode():
            yield
    finally:
        for name, original in patched.items():
            setattr(torch.Tensor, name, original)


def test_the_guard_catches_value_reads():
    x = torch.rand(4, requires_grad=True)
    reads = [lambda: x.sum().item(), lambda: bool((x > 0).all()), lambda: float(x[0]),
             lambda: int(x.argmax()), lambda: x.tolist(), lambda: x.nonzero(),
             lambda: torch.nonzero(x), lambda: x[x > 0.5], lambda: x.detach().numpy(),
             lambda: torch.equal(x, x), lambda: x.unique(), lambda: [0, 1][x.argmax()]]
    for read in reads:
        with pytest.raises(HostSync), no_host_sync():
            read()
    with no_host_sync():  # shape checks and device-side reductions are fine
        assert x.shape[0] == 4 and x.dim() == 1
        (x * 2).sum().backward()


# ------------------------------------------------------------------------------------------------
# Every op x every available backend, forward and backward
# ------------------------------------------------------------------------------------------------
def _device_for(backend: str) -> torch.device:
    if backend in ("cuda",) or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _msca_case(dev, dtype):
    C = 8
    u = torch.randn(1, C, 9, 7, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)
    ws = [(torch.randn(s, device=dev, dtype=dtype) * 0.2) for s in weight_shapes(C)]
    leaves = [u] + ws
    return leaves, lambda b: sk.msca(leaves[0], *leaves[1:], backend=b)


def _dwconv_gelu_case(dev, dtype):
    leaves = [torch.randn(1, 8, 9, 7, device=dev, dtype=dtype), torch.randn(8, 1, 3, 3, device=dev, dtype=dtype),
              torch.randn(8, device=dev, dtype=dtype)]
    return leaves, lambda b: sk.dwconv_gelu(*leaves, backend=b)


def _mlp_case(dev, dtype):
    C, Hd = 8, 32
    shapes = [(1, C, 9, 7), (Hd, C, 1, 1), (Hd,), (Hd, 1, 3, 3), (Hd,), (C, Hd, 1, 1), (C,)]
    leaves = [torch.randn(s, device=dev, dtype=dtype) * 0.3 for s in shapes]
    return leaves, lambda b: sk.mlp(*leaves, backend=b)


def _nmf_case(dev, dtype, grad="unrolled"):
    x = torch.rand(2, 16, 4, 5, device=dev, dtype=dtype)
    bases = torch.rand(2, 16, 4, device=dev, dtype=dtype)
    return [x], lambda b: sk.nmf2d(x, R=4, steps=3, bases=bases, grad=grad, backend=b)


def _nmf_drawn_case(dev, dtype):
    x = torch.rand(2, 16, 4, 5, device=dev, dtype=dtype)
    g = torch.Generator(device=dev).manual_seed(0)
    return [x], lambda b: sk.nmf2d(x, R=4, steps=3, generator=g, grad="one_step", backend=b)


def _strip_conv_case(dev, dtype):
    leaves = [torch.randn(1, 8, 9, 7, device=dev, dtype=dtype), torch.randn(8, 1, 1, 7, device=dev, dtype=dtype),
              torch.randn(8, device=dev, dtype=dtype)]
    return leaves, lambda b: strip_conv(*leaves, backend=b)


CASES = {"msca": _msca_case, "dwconv_gelu": _dwconv_gelu_case, "mlp": _mlp_case, "nmf2d": _nmf_case,
         "nmf2d-drawn-bases": _nmf_drawn_case, "strip_conv": _strip_conv_case}
OP_OF = {"nmf2d-drawn-bases": "nmf2d"}


def _op_backend_pairs():
    status = sk.available_backends()
    pairs = []
    for case in CASES:
        for b in sk.op_backends().get(OP_OF.get(case, case), ()):
            if status[b].available:
                pairs.append(pytest.param(case, b, id=f"{case}-{b}"))
    return pairs


@pytest.mark.parametrize("case, backend", _op_backend_pairs())
def test_forward_and_backward_read_nothing_back(case, backend):
    dev = _device_for(backend)
    leaves, run = CASES[case](dev, torch.float32)

    def step(with_grad: bool):
        for t in leaves:
            t.grad = None
            t.requires_grad_(with_grad)
        if not with_grad:
            with torch.no_grad():
                return run(backend)
        out = run(backend)
        out.backward(torch.ones_like(out))
        return out

    for with_grad in (False, True):
        step(with_grad)  # warm-up: compilation, one-time checks, caches
        with no_host_sync():
            step(with_grad)


@pytest.mark.parametrize("backend", [b for b in ("reference", "cpu") if sk.available_backends()[b].available])
def test_segnext_training_step_reads_nothing_back(backend):
    """The whole model: MSCAN-T blocks, the Hamburger head, the loss."""
    from segnext import segnext_t
    model = segnext_t(num_classes=5)
    img = torch.randn(2, 3, 32, 32)
    target = torch.randint(0, 5, (2, 4, 4))

    def step():
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(img), target)
        loss.backward()

    with sk.use_backend(backend):
        step()
        with no_host_sync():
            step()
        model.eval()
        with torch.no_grad():
            model(img)
            with no_host_sync():
                model(img)


def test_nmf2d_value_check_is_the_only_read_and_only_when_asked(monkeypatch):
    x = torch.rand(1, 8, 4, 4)
    monkeypatch.setenv("SEGNEXT_CHECK_INPUTS", "1")
    with pytest.raises(HostSync), no_host_sync():
        sk.nmf2d(x, R=2, steps=1, backend="reference")
    monkeypatch.setenv("SEGNEXT_CHECK_INPUTS", "0")
    with no_host_sync():
        sk.nmf2d(x, R=2, steps=1, backend="reference")


# ------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): the functional wrappers trace without a graph break
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["msca", "dwconv_gelu", "mlp", "nmf2d", "strip_conv"])
def test_functional_wrappers_compile_fullgraph(case):
    backend = "cpu" if "cpu" in sk.op_backends().get(case, ()) and sk.available_backends()["cpu"].available \
        else "reference"
    torch._dynamo.reset()
    leaves, run = CASES[case](torch.device("cpu"), torch.float32)
    with torch.no_grad():
        want = run(backend)
        got = torch.compile(lambda: run(backend), fullgraph=True, backend="eager")()
    torch.testing.assert_close(got, want)


# ------------------------------------------------------------------------------------------------
# Source scan
# ------------------------------------------------------------------------------------------------
VALUE_READ = re.compile(r"\.item\(|\.tolist\(|\.numpy\(|\.cpu\(|nonzero|torch\.equal\(|\.unique\(|"
                        r"bool\(\(|\.all\(\)\)|\.any\(\)\)|masked_select|synchronize\(")
# (file, text of the line) that may read values: each with why
ALLOWED = {
    # behind SEGNEXT_CHECK_INPUTS=1 (off by default), skipped under compile/graph capture
    ("segnext_kernels/nmf2d/functional.py", 'if not bool(((t >= 0) & torch.isfinite(t)).all()):  # NaN fails both'),
}


CXX_SYNC = re.compile(r"\.item<|\.item\(\)|cudaDeviceSynchronize|cudaStreamSynchronize|"
                      r"cudaMemcpy\(|\.cpu\(\)|synchronize\(")


def test_source_scan_finds_no_new_value_reads():
    # C++/CUDA: no value read or synchronisation in the kernels and their glue
    cxx = [(p.relative_to(ROOT).as_posix(), line.strip()) for p in sorted((ROOT / "csrc").rglob("*"))
           if p.suffix in (".cpp", ".cu", ".cuh", ".h") for line in p.read_text().splitlines()
           if CXX_SYNC.search(line.split("//", 1)[0])]
    assert not cxx, f"host syncs in csrc/: {cxx}"
    found = set()
    for path in sorted((ROOT / "segnext_kernels").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        # diagnostics, and the one-time check of each kernel configuration before its first use
        # (the dynamic test above shows it is not on the per-call path)
        if rel in ("segnext_kernels/info.py", "segnext_kernels/selftest.py"):
            continue
        for line in path.read_text().splitlines():
            code = line.split("#", 1)[0] if not line.strip().startswith("if") else line
            if VALUE_READ.search(code):
                found.add((rel, line.strip()))
    unexpected = found - ALLOWED
    assert not unexpected, ("value reads on an op path (move them behind SEGNEXT_CHECK_INPUTS, or "
                            f"list them in ALLOWED with the reason): {sorted(unexpected)}")
    assert ALLOWED <= found, f"ALLOWED lists lines that no longer exist: {sorted(ALLOWED - found)}"
