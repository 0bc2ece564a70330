"""Build and run CUDA kernels on the CPU through the emulation harness (docs/cuda_emulation.md).

The .cu sources compile unchanged as host C++: include/ holds stand-ins for the CUDA headers
(cuda_emu.h), and ``translate`` rewrites the two pieces of CUDA syntax that are not C++ --
``kernel<<<grid, block, smem, stream>>>(args)`` and ``__shared__`` declarations -- into calls of
the emulation runtime, keeping every line number. The kernel translation unit is compiled with
GCC's ThreadSanitizer instrumentation (-fsanitize=thread) but linked against our own hooks
(cuda_emu_runtime.cpp), which bounds-check and race-check every shared and device memory access.

``build_executable`` links a driver (``msca_emu_main.cpp``, ``selftest_main.cpp``) with an emulated
.cu and caches the result under build/cuda_emu/ by a hash of everything that goes into it;
``build_msca`` is that for csrc/cuda/msca_cuda.cu (optionally mutated, for the planted-bug tests).
``run_msca`` runs one forward or backward case in a subprocess (a kernel that crashes or hangs
cannot take the test process with it).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
from typing import Callable, Optional, Sequence

import torch

from segnext_kernels.msca.reference import MSCAWeights

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
CSRC_HEADERS = (ROOT / "csrc" / "msca_weights.h",)  # torch-free headers the .cuh includes
BUILD_DIR = ROOT / "build" / "cuda_emu"

# GCC's instrumentation, with our hooks instead of libtsan; no function entry/exit hooks, no
# builtins turned into library calls (a memset would bypass the checks).
KERNEL_FLAGS = ("-std=c++17", "-O2", "-fno-strict-aliasing", "-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0",
                "-fno-builtin", "-fno-tree-loop-distribute-patterns", "-Wno-unknown-pragmas",
                "-Wno-attributes")
HOST_FLAGS = ("-std=c++17", "-O2", "-Wall")

DTYPE_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
WEIGHT_NAMES = MSCAWeights._fields  # the files msca_emu_main.cpp reads and writes


class TranslateError(ValueError):
    pass


# ------------------------------------------------------------------------------------------------
# Translation: CUDA syntax -> calls of the emulation runtime (line numbers kept)
# ------------------------------------------------------------------------------------------------
def _matching(text: str, at: int, open_ch: str, close_ch: str, step: int) -> int:
    """Index of the bracket matching the one at text[at]: an ``open_ch`` matched forward
    (``step`` 1) or a ``close_ch`` matched back (``step`` -1)."""
    same, other = (open_ch, close_ch) if step == 1 else (close_ch, open_ch)
    depth = 0
    for i in range(at, len(text) if step == 1 else -1, step):
        if text[i] == same:
            depth += 1
        elif text[i] == other:
            depth -= 1
            if depth == 0:
                return i
    where = "after" if step == 1 else "before"
    raise TranslateError(f"unbalanced {open_ch}{close_ch} {where} offset {at}")


def _callee_start(text: str, end: int) -> int:
    """Start of the kernel expression that ends just before ``end`` (``name`` or ``name<...>``,
    possibly qualified)."""
    i = end
    while i > 0 and text[i - 1].isspace():
        i -= 1
    if text[i - 1] == ">":
        i = _matching(text, i - 1, "<", ">", -1)
    while i > 0 and (text[i - 1].isalnum() or text[i - 1] in "_:"):
        i -= 1
    if i == end:
        raise TranslateError(f"no kernel name before <<< at offset {end}")
    return i


def _rewrite_launches(text: str) -> str:
    out, pos = [], 0
    while True:
        k = text.find("<<<", pos)
        if k < 0:
            break
        start = _callee_start(text, k)
        close = text.find(">>>", k)
        if close < 0:
            raise TranslateError(f"<<< without >>> at offset {k}")
        paren = close + 3
        while text[paren].isspace():
            paren += 1
        if text[paren] != "(":
            raise TranslateError(f"kernel launch without an argument list at offset {k}")
        end = _matching(text, paren, "(", ")", 1)
        callee = text[start:k].strip()
        config, args = text[k + 3:close], text[paren + 1:end]
        sep = ", " if args.strip() else ""
        name = " ".join(callee.split()).replace('"', "")
        out.append(text[pos:start])
        out.append(f'::cuda_emu::launch_kernel("{name}", {callee}, '
                   f"::cuda_emu::make_launch_config({config}){sep}{args})")
        pos = end + 1
    out.append(text[pos:])
    return "".join(out)


_DYNAMIC_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s+)?(?P<type>[\w:\s]+?)\s+(?P<name>\w+)\s*\[\s*\]\s*;")
_STATIC_SHARED = re.compile(
    r"(?:static\s+)?__shared__\s+(?:__align__\s*\(\s*(?P<align>\d+)\s*\)\s+)?(?P<type>[\w:<>,\s]+?)\s+"
    r"(?P<name>\w+)\s*(?P<dims>(?:\[[^\]]+\]\s*)*);")


def _rewrite_shared(text: str) -> str:
    # extern __shared__ T name[];  ->  T* const name = (T*) <the block's dynamic shared memory>;
    text = _DYNAMIC_SHARED.sub(
        lambda m: f"{m['type']}* const {m['name']} = static_cast<{m['type']}*>(::cuda_emu::dynamic_shared());",
        text)

    # __shared__ T name[dims];  ->  a reference to the block's static shared memory
    def static(m: re.Match) -> str:
        t = f"cuda_emu_shared_t_{m['name']}"
        line = text.count("\n", 0, m.start()) + 1
        align = m["align"] or f"alignof({t})"
        return (f"typedef {m['type']} {t}{m['dims'] or ''}; {t}& {m['name']} = *static_cast<{t}*>("
                f'::cuda_emu::static_shared(sizeof({t}), {align}, "{m["name"]}@{line}"));')

    text = _STATIC_SHARED.sub(static, text)
    if "__shared__" in text:
        line = text.count("\n", 0, text.index("__shared__")) + 1
        raise TranslateError(f"a __shared__ declaration the harness cannot rewrite (line {line})")
    return text


def translate(source: str, filename: str) -> str:
    """The host-C++ form of a .cu source for the emulator (line numbers kept)."""
    text = _rewrite_launches(source)
    text = _rewrite_shared(text)
    return f'#line 1 "{filename}"\n' + text


# ------------------------------------------------------------------------------------------------
# Build (cached by content)
# ------------------------------------------------------------------------------------------------
def find_cxx() -> Optional[str]:
    """A GCC able to build the harness (GCC's -fsanitize=thread instrumentation is used)."""
    for name in (os.environ.get("CUDA_EMU_CXX"), "g++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _compiler_id(cxx: str) -> str:
    return subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[0]


def _run(cmd: Sequence[str], what: str) -> None:
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({' '.join(cmd)}):\n{proc.stdout}{proc.stderr}")


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _compile_all(jobs: Sequence[Sequence[str]]) -> None:
    procs = [subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd in jobs]
    for cmd, p in zip(jobs, procs):
        log = p.communicate()[0]
        if p.returncode != 0:
            raise RuntimeError(f"compiling for the CUDA emulator failed ({' '.join(cmd)}):\n{log}")


def build_executable(kernel_cu: pathlib.Path, main_cpp: pathlib.Path, *,
                     mutate: Optional[Callable[[str], str]] = None, tag: str = "",
                     defines: Sequence[str] = ()) -> pathlib.Path:
    """An executable of ``main_cpp`` linked with the emulated ``kernel_cu`` (after ``mutate`` of
    its text, if given), built under build/cuda_emu/ and reused while none of its inputs change."""
    cxx = find_cxx()
    if cxx is None:
        raise RuntimeError("g++ not found: the CUDA emulation harness needs GCC")
    source = kernel_cu.read_text()
    if mutate is not None:
        mutated = mutate(source)
        if mutated == source:
            raise ValueError("the mutation did not change the source")
        source = mutated
    kernel_cpp = translate(source, str(kernel_cu))
    includes = ("-I", str(HERE / "include"), "-I", str(HERE), "-I", str(kernel_cu.parent))
    headers = "".join(p.read_text() for p in sorted(HERE.glob("*.h")) + sorted(HERE.glob("include/*.h"))
                      + sorted(kernel_cu.parent.glob("*.cuh")) + list(CSRC_HEADERS))
    compiler = _compiler_id(cxx)
    host_key = _digest(compiler, " ".join(HOST_FLAGS), headers,
                       (HERE / "cuda_emu_runtime.cpp").read_text(), main_cpp.read_text())
    exe_key = _digest(host_key, " ".join(KERNEL_FLAGS + tuple(defines)), kernel_cpp)
    stem = main_cpp.stem
    exe = BUILD_DIR / f"{stem}{('-' + tag) if tag else ''}-{exe_key}" / stem
    if exe.exists():
        return exe
    host_dir = BUILD_DIR / f"host-{stem}-{host_key}"
    exe.parent.mkdir(parents=True, exist_ok=True)
    host_dir.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=exe.parent))
    try:
        (tmp / "kernels.cpp").write_text(kernel_cpp)
        jobs = [[cxx, *KERNEL_FLAGS, *(f"-D{d}" for d in defines), *includes, "-c",
                 str(tmp / "kernels.cpp"), "-o", str(tmp / "kernels.o")]]
        host_objs = []
        for src in (HERE / "cuda_emu_runtime.cpp", main_cpp):
            obj = host_dir / f"{src.stem}.o"
            host_objs.append(obj)
            if not obj.exists():
                jobs.append([cxx, *HOST_FLAGS, *includes, "-c", str(src), "-o", str(tmp / obj.name)])
        _compile_all(jobs)
        for obj in host_objs:
            if (tmp / obj.name).exists():
                os.replace(tmp / obj.name, obj)
        # Linked without -fsanitize=thread: the hooks come from the runtime, not libtsan.
        _run([cxx, str(tmp / "kernels.o"), *map(str, host_objs), "-o", str(tmp / stem)], f"linking {stem}")
        os.replace(tmp / stem, exe)  # atomic: a concurrent build finds a complete file
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return exe


def build_msca(mutate: Optional[Callable[[str], str]] = None, tag: str = "",
               defines: Sequence[str] = ()) -> pathlib.Path:
    """msca_emu: csrc/cuda/msca_cuda.cu (optionally mutated) behind msca_emu_main.cpp."""
    return build_executable(CUDA_DIR / "msca_cuda.cu", HERE / "msca_emu_main.cpp", mutate=mutate,
                            tag=tag, defines=defines)


def build_selftest() -> pathlib.Path:
    """cuda_emu_selftest: the harness's own test kernels (selftest_kernels.cu)."""
    return build_executable(HERE / "selftest_kernels.cu", HERE / "selftest_main.cpp")


# ------------------------------------------------------------------------------------------------
# Running one case
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class EmuResult:
    returncode: int
    report: str                   # the emulator's summary, errors first
    outputs: dict                 # name -> tensor (NCHW for activations), empty if it failed

    @property
    def clean(self) -> bool:
        return self.returncode == 0

    def error_counts(self) -> dict:
        """{"shared-race": 12, ...} from the report."""
        return {m[1]: int(m[2]) for m in re.finditer(r"^errors (\S+): (\d+)$", self.report, re.M)}


def _to_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    return t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.uint8 else t.numpy().tobytes()


def _from_bytes(data: bytes, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape).clone()


def run_msca(exe: pathlib.Path, op: str, u: torch.Tensor, weights: Sequence[torch.Tensor],
             grad: Optional[torch.Tensor] = None, *, misalign: bool = False, device: str = "sm_90",
             order: str = "forward", timeout: float = 600) -> EmuResult:
    """Runs the emulated kernels the way msca_cuda_glue.cpp runs them: ``u`` (B, C, H, W) in
    either memory format is handed over channels-last; outputs come back in ``u``'s format."""
    if op not in ("fwd", "bwd"):
        raise ValueError(f"op must be 'fwd' or 'bwd', got {op!r}")
    dt = DTYPE_NAMES[u.dtype]
    B, C, H, W = u.shape
    fmt = torch.channels_last if u.is_contiguous(memory_format=torch.channels_last) and not \
        u.is_contiguous() else torch.contiguous_format
    nhwc = lambda t: t.permute(0, 2, 3, 1).contiguous()  # noqa: E731 - the glue's as_channels_last
    with tempfile.TemporaryDirectory(prefix="msca_emu_") as d:
        d = pathlib.Path(d)
        (d / "u.bin").write_bytes(_to_bytes(nhwc(u)))
        for name, w in zip(WEIGHT_NAMES, weights):
            (d / f"{name}.bin").write_bytes(_to_bytes(w))
        if op == "bwd":
            (d / "grad.bin").write_bytes(_to_bytes(nhwc(grad)))
        env = dict(os.environ, CUDA_EMU_DEVICE=device, CUDA_EMU_ORDER=order)
        cmd = [str(exe), op, dt, str(B), str(H), str(W), str(C), str(d), str(d)]
        if misalign:
            cmd.append("misalign")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired as exc:
            return EmuResult(124, f"timed out after {timeout} s\n{exc.stdout or ''}", {})
        report = proc.stdout + proc.stderr
        outputs = {}
        act = lambda p: _from_bytes(p.read_bytes(), u.dtype, (B, H, W, C)).permute(0, 3, 1, 2) \
            .contiguous(memory_format=fmt)  # noqa: E731
        if (d / "out.bin").exists():
            outputs["out"] = act(d / "out.bin")
        if (d / "grad_u.bin").exists():
            outputs["grad_u"] = act(d / "grad_u.bin")
            for name, w in zip(WEIGHT_NAMES, weights):
                outputs[name] = _from_bytes((d / f"g_{name}.bin").read_bytes(), u.dtype, w.shape)
        return EmuResult(proc.returncode, report, outputs)
