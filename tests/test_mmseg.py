"""segnext_kernels.mmseg against the real mmsegmentation (1.2.2, mmengine 0.10.7, mmcv-lite 2.1.0).

SegNeXt-T is built from mmseg's own config file (shipped inside the mmseg wheel) and trained a
few iterations by mmseg's Runner on tiny synthetic ADE20K-layout data (written to tmp_path and
read through the config's own data pipeline, at 64x64 crops instead of 512x512): once as is, and
once with docs/mmseg/'s config file (mmseg's plus the two lines of docs/mmseg.md). Losses,
first-iteration gradients, parameters after training, val/test logits, EMA, checkpoints, resume
and DDP under torch.distributed.run are compared between the two.

Under mmcv-lite mmseg cannot import its models (mmcv.ops has no compiled ops), so the tests call
``segnext_kernels.mmseg.mmcv_lite.stub_mmcv_ops()`` first; SegNeXt uses none of those ops.

Without mmseg these tests skip, except under CI (CI=true), where .ci/run installs
requirements-mmseg.txt and a missing mmseg is a failure. Run as a script
(``python -m torch.distributed.run ... tests/test_mmseg.py --ddp-worker DIR``), this file is the
worker of the distributed test.
"""
from __future__ import annotations

import copy
import importlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from utils import MMSEG_WARNINGS

ROOT = Path(__file__).resolve().parents[1]
DOCS_CONFIG = ROOT / "docs" / "mmseg" / "segnext_mscan-t_fused_ade20k-512x512.py"
SWAPPED_T = {("MSCAAttention", "MSCA"): 13, ("Mlp", "FusedMlp"): 13, ("NMF2D", "NMF2D"): 1}
SIDE = 64       # crop side (the config's is 512)
pytestmark = MMSEG_WARNINGS
N_IMAGES = 4


def _have_mmseg() -> bool:
    try:
        import mmengine  # noqa: F401
        import mmseg  # noqa: F401
        return True
    except ImportError:
        return False


HAVE_MMSEG = _have_mmseg()
needs_mmseg = pytest.mark.skipif(not HAVE_MMSEG, reason="mmsegmentation not installed "
                                 "(pip install -r requirements-mmseg.txt)")


def test_ci_installs_mmseg():
    """CI (.ci/run) installs requirements-mmseg.txt: there these tests must run, not skip."""
    if os.environ.get("CI", "").strip().lower() not in ("1", "true", "yes"):
        pytest.skip("not under CI")
    assert HAVE_MMSEG, "CI must run the mmseg tests: .ci/run installs requirements-mmseg.txt"


def test_import_without_mmengine_says_what_to_install(monkeypatch):
    for name in [m for m in sys.modules if m.startswith("segnext_kernels.mmseg")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mmengine", None)  # import mmengine now fails
    with pytest.raises(ImportError, match=r"needs mmsegmentation.*requirements-mmseg\.txt"):
        importlib.import_module("segnext_kernels.mmseg")


# --- helpers: data, config, runs ------------------------------------------------------------

def write_ade_like(root: Path, n: int = N_IMAGES, seed: int = 0) -> Path:
    """n random JPEG images and PNG label maps (ADE20K values 0..150) in ADE20K's layout."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            h, w = int(rng.integers(56, 97)), int(rng.integers(56, 97))
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            # blocky labels: regions, as in a real mask, not per-pixel noise
            small = rng.integers(0, 151, (h // 8 + 1, w // 8 + 1)).astype(np.uint8)
            label = np.kron(small, np.ones((8, 8), np.uint8))[:h, :w]
            Image.fromarray(img).save(root / "images" / split / f"{i:03d}.jpg")
            Image.fromarray(label).save(root / "annotations" / split / f"{i:03d}.png")
    return root


MMSEG_CONFIG = "segnext_mscan-t_1xb16-adamw-160k_ade20k-512x512.py"  # mmseg's own SegNeXt-T
FUSED_CONFIG = DOCS_CONFIG.name  # the same with the two lines, as docs/mmseg.md gives it


def copy_mmseg_configs(dest: Path) -> Path:
    """mmseg's config files as shipped in its wheel (``_base_`` and ``segnext``), with the docs'
    fused config placed beside mmseg's SegNeXt configs, where docs/mmseg.md tells users to."""
    import shutil

    import mmseg
    shipped = Path(mmseg.__file__).parent / ".mim" / "configs"
    for folder in ("_base_", "segnext"):
        shutil.copytree(shipped / folder, dest / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    assert (dest / "segnext" / MMSEG_CONFIG).is_file()
    shutil.copy(DOCS_CONFIG, dest / "segnext" / FUSED_CONFIG)
    return dest


def make_workspace(root: Path) -> Path:
    """``root/configs`` (mmseg's and the docs' configs) and ``root/ade`` (tiny data)."""
    copy_mmseg_configs(root / "configs")
    write_ade_like(root / "ade")
    return root


def make_cfg(ws: Path, work_dir: Path, *, fused: bool, iters: int = 4,
             ckpt_interval: int = 2, val: bool = True, ema: bool = False,
             backend: str = "auto"):
    """mmseg's SegNeXt-T config (``fused``: the docs' config file, i.e. it plus the two lines)
    with tiny data and a short schedule."""
    from mmengine.config import Config
    from segnext_kernels.mmseg.mmcv_lite import stub_mmcv_ops
    stub_mmcv_ops()
    cfg = Config.fromfile(str(ws / "configs" / "segnext" / (FUSED_CONFIG if fused else MMSEG_CONFIG)))
    assert ("custom_imports" in cfg) == fused
    cfg.model.backbone.init_cfg = None   # the ImageNet checkpoint would be downloaded
    cfg.model.data_preprocessor.size = (SIDE, SIDE)
    train_pipeline = copy.deepcopy(cfg.train_pipeline)
    train_pipeline[2]["scale"] = (4 * SIDE, SIDE)      # RandomResize, 2048x512 in the config
    train_pipeline[3]["crop_size"] = (SIDE, SIDE)      # RandomCrop
    test_pipeline = copy.deepcopy(cfg.test_pipeline)
    test_pipeline[1]["scale"] = (4 * SIDE, SIDE)       # Resize
    for loader, pipeline in (("train_dataloader", train_pipeline),
                             ("val_dataloader", test_pipeline),
                             ("test_dataloader", test_pipeline)):
        dl = cfg[loader]
        dl.batch_size = 2 if loader == "train_dataloader" else 1
        dl.num_workers = 0
        dl.persistent_workers = False
        dl.dataset.data_root = str(ws / "ade")
        dl.dataset.pipeline = pipeline
        if loader != "train_dataloader":
            dl.dataset.data_prefix = dict(img_path="images/validation",
                                          seg_map_path="annotations/validation")
    cfg.param_scheduler = []             # constant lr: the config's warmup starts at 6e-11
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=iters,
                         val_interval=iters if val else iters + 1)
    if not val:
        cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", by_epoch=False,
                                        interval=ckpt_interval)
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=1, log_metric_by_epoch=False)
    cfg.env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork"),
                       dist_cfg=dict(backend="gloo"))
    cfg.randomness = dict(seed=0)
    cfg.log_level = "WARNING"
    cfg.work_dir = str(work_dir)
    if fused:
        assert cfg.custom_hooks == [dict(type="SegNeXtKernelsHook", backend="auto")]
        cfg.custom_hooks[0]["backend"] = backend
    else:
        cfg.custom_hooks = []
    if ema:
        cfg.custom_hooks.append(dict(type="EMAHook"))
    return cfg


def make_runner(cfg):
    from mmengine.runner import Runner
    runner = Runner.from_cfg(cfg)
    runner.logger.setLevel("WARNING")
    return runner


class Recorder:
    """A plain mmengine hook that keeps each train loss, the backend in use, val/test logits,
    and the gradients of the first training iteration (as they are accumulated: the optimizer
    step and zero_grad follow within the iteration)."""

    def __init__(self):
        from mmengine.hooks import Hook
        self.losses, self.backends, self.logits = [], [], []
        self.grads, self.initial, self._handles = {}, {}, []
        self.hook = type("RecorderHook", (Hook,), {
            "priority": "LOWEST",
            "before_train_iter": lambda h, runner, batch_idx, data_batch=None:
                self._watch(runner) if not self.losses else None,
            "after_train_iter": lambda h, runner, batch_idx, data_batch=None, outputs=None:
                self._train(outputs),
            "after_val_iter": lambda h, runner, batch_idx, data_batch=None, outputs=None:
                self._eval(outputs),
            "after_test_iter": lambda h, runner, batch_idx, data_batch=None, outputs=None:
                self._eval(outputs),
        })()

    def _watch(self, runner):
        def keep(p, name):
            self.grads[name] = p.grad.detach().clone()
        self.initial = {n: p.detach().clone() for n, p in model_of(runner).named_parameters()}
        for name, p in model_of(runner).named_parameters():
            if p.requires_grad:
                self._handles.append(
                    p.register_post_accumulate_grad_hook(lambda p, name=name: keep(p, name)))

    def _train(self, outputs):
        import segnext_kernels as sk
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.losses.append(float(outputs["loss"].detach()))
        self.backends.append(sk.get_backend())

    def _eval(self, outputs):
        self.logits += [s.seg_logits.data.detach().clone() for s in outputs]


def run(cfg, how: str = "train"):
    """Run a Runner; returns (runner, recorder, result)."""
    rec = Recorder()
    cfg = copy.deepcopy(cfg)
    runner = make_runner(cfg)
    runner.register_hook(rec.hook)
    result = getattr(runner, how)()
    return runner, rec, result


def fused_hook(runner):
    from segnext_kernels.mmseg import SegNeXtKernelsHook
    found = [h for h in runner.hooks if isinstance(h, SegNeXtKernelsHook)]
    assert len(found) == 1
    return found[0]


def swapped(replaced):
    return dict(Counter((r.original, r.new) for r in replaced))


def model_of(runner):
    from mmengine.model import is_model_wrapper
    return runner.model.module if is_model_wrapper(runner.model) else runner.model


def assert_training_matches(fused, eager, what: str) -> None:
    """Losses of every iteration, gradients of the first one, and parameters after the last.

    Parameters whose gradient is zero in exact arithmetic (the patch embeddings' conv biases,
    followed by BatchNorm) are left out of the last check: AdamW moves them by about +-lr on
    rounding noise, in either run."""
    (f_runner, f_rec), (e_runner, e_rec) = fused, eager
    assert len(f_rec.losses) == len(e_rec.losses) > 0
    assert all(np.isfinite(f_rec.losses))
    np.testing.assert_allclose(f_rec.losses, e_rec.losses, rtol=2e-5, err_msg=what)

    assert f_rec.grads.keys() == e_rec.grads.keys() and e_rec.grads
    scale = max(float(g.abs().max()) for g in e_rec.grads.values())
    for name, want in e_rec.grads.items():
        torch.testing.assert_close(f_rec.grads[name], want, rtol=1e-4, atol=1e-6 * scale,
                                   msg=lambda m: f"{what}: gradient of {name}: {m}")
    total = torch.sqrt(sum(g.double().square().sum() for g in e_rec.grads.values()))
    noise = {n for n, g in e_rec.grads.items() if float(g.norm()) < 1e-6 * float(total)}
    assert noise and all(n.startswith("backbone.patch_embed") and n.endswith("bias")
                         for n in noise), noise

    pf, pe = dict(model_of(f_runner).named_parameters()), dict(model_of(e_runner).named_parameters())
    assert pf.keys() == pe.keys()
    for name in pe.keys() - noise:
        torch.testing.assert_close(pf[name], pe[name], rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{what}: parameter {name}: {m}")


# --- tests -----------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: with other processes on the CPU, OpenMP threads that wait for each
    other make a 0.1 s training step of these tiny batches take seconds."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("mmseg"))


@pytest.fixture(scope="module")
def trained(workspace, tmp_path_factory):
    """Training runs shared by the tests below: as is, and with the two config lines (with EMA)."""
    base = tmp_path_factory.mktemp("runs")
    eager = run(make_cfg(workspace, base / "eager", fused=False, ema=True))
    fused = run(make_cfg(workspace, base / "fused", fused=True, ema=True))
    return dict(eager=eager, fused=fused, base=base)


@needs_mmseg
def test_two_config_lines_swap_and_training_matches(trained):
    (e_runner, e_rec, _), (f_runner, f_rec, _) = trained["eager"], trained["fused"]
    hook = fused_hook(f_runner)
    assert swapped(hook.model_replaced) == SWAPPED_T
    assert swapped(hook.replaced) == SWAPPED_T  # EMA copied the fused model: nothing more to swap
    assert not any(isinstance(h, type(hook)) for h in e_runner.hooks)

    # the model runs our modules, with the same parameter objects the optimizer was built on
    import segnext_kernels as sk
    model = model_of(f_runner)
    assert isinstance(model.backbone.block1[0].attn.spatial_gating_unit, sk.MSCA)
    assert isinstance(model.backbone.block1[0].mlp, sk.FusedMlp)
    assert isinstance(model.decode_head.hamburger.ham, sk.NMF2D)
    opt_params = {id(p) for g in f_runner.optim_wrapper.optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in model.parameters() if p.requires_grad} == opt_params

    assert len(f_rec.losses) == 4
    assert len(set(e_rec.losses)) > 1  # different batches: not a constant
    assert_training_matches((f_runner, f_rec), (e_runner, e_rec), "4 AdamW iterations")
    assert f_rec.backends == ["auto"] * 4
    assert sk.get_backend() == "auto"  # restored at after_run


@needs_mmseg
def test_val_loop_with_ema_matches(trained):
    (_, e_rec, _), (f_runner, f_rec, _) = trained["eager"], trained["fused"]
    # the val loop ran at the last iteration, on EMA weights swapped into the fused model
    assert len(f_rec.logits) == len(e_rec.logits) == N_IMAGES
    for got, want in zip(f_rec.logits, e_rec.logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    ema = next(h for h in f_runner.hooks if type(h).__name__ == "EMAHook").ema_model
    import segnext_kernels as sk
    assert sum(isinstance(m, (sk.MSCA, sk.FusedMlp, sk.NMF2D)) for m in ema.modules()) == 27


@pytest.fixture
def load_own_checkpoints(monkeypatch):
    """mmengine 0.10.7 loads checkpoints with a plain torch.load, which since torch 2.6 refuses
    the mmengine objects in them (open-mmlab/mmengine#1655, unrelated to segnext_kernels);
    these are checkpoints the test wrote itself."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")


@pytest.mark.usefixtures("load_own_checkpoints")
@needs_mmseg
def test_checkpoint_keys_unchanged_and_resume_matches(trained, workspace):
    from mmengine.runner import CheckpointLoader
    base = trained["base"]
    ckpt_fused = base / "fused" / "iter_2.pth"
    ckpt_eager = base / "eager" / "iter_2.pth"
    fused_sd = CheckpointLoader.load_checkpoint(str(ckpt_fused), map_location="cpu")
    eager_sd = CheckpointLoader.load_checkpoint(str(ckpt_eager), map_location="cpu")
    assert list(fused_sd["state_dict"]) == list(eager_sd["state_dict"])
    assert list(fused_sd["ema_state_dict"]) == list(eager_sd["ema_state_dict"])
    assert "optimizer" in fused_sd

    # resume the fused run's checkpoint, fused and not: iterations 3 and 4 again
    resumed = {}
    for fused in (False, True):
        cfg = make_cfg(workspace, base / f"resume_{fused}", fused=fused, val=False,
                       ckpt_interval=100, backend="reference")
        cfg.resume, cfg.load_from = True, str(ckpt_fused)
        resumed[fused] = run(cfg)
    (e_runner, e_rec, _), (f_runner, f_rec, _) = resumed[False], resumed[True]
    assert e_runner.iter == f_runner.iter == 4 and len(f_rec.losses) == 2
    assert swapped(fused_hook(f_runner).model_replaced) == SWAPPED_T
    assert f_rec.backends == ["reference"] * 2  # the hook's backend, during the run only
    assert_training_matches((f_runner, f_rec), (e_runner, e_rec), "resumed")


@pytest.mark.usefixtures("load_own_checkpoints")
@needs_mmseg
def test_test_loop_matches(trained, workspace):
    ckpt = str(trained["base"] / "fused" / "iter_4.pth")
    out = {}
    for fused in (False, True):
        cfg = make_cfg(workspace, trained["base"] / f"test_{fused}", fused=fused)
        cfg.load_from = ckpt
        out[fused] = run(cfg, "test")
    (_, e_rec, e_metrics), (f_runner, f_rec, f_metrics) = out[False], out[True]
    assert swapped(fused_hook(f_runner).model_replaced) == SWAPPED_T
    assert len(f_rec.logits) == N_IMAGES
    for got, want in zip(f_rec.logits, e_rec.logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert set(f_metrics) == set(e_metrics) and "mIoU" in f_metrics


@needs_mmseg
def test_optimizer_built_after_the_swap(trained, workspace):
    """sk.patch on the Runner's model before runner.train(): the Runner builds its optimizer
    (the config's AdamW with parameter groups by name) on the swapped model."""
    import segnext_kernels as sk
    cfg = copy.deepcopy(make_cfg(workspace, trained["base"] / "patched_first", fused=False,
                                 ema=True))
    rec = Recorder()
    runner = make_runner(cfg)
    runner.register_hook(rec.hook)
    assert swapped(sk.patch(runner.model)) == SWAPPED_T
    runner.train()
    e_runner, e_rec, _ = trained["eager"]
    assert_training_matches((runner, rec), (e_runner, e_rec), "optimizer built after the swap")
    for got, want in zip(rec.logits, e_rec.logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@needs_mmseg
def test_ema_copied_before_the_swap_is_fused_too_and_deepcopy(workspace, tmp_path):
    """EMAHook given a higher priority copies the model first; the hook swaps that copy too."""
    import segnext_kernels as sk
    cfg = make_cfg(workspace, tmp_path / "ema_first", fused=True, val=False)
    cfg.custom_hooks = cfg.custom_hooks + [dict(type="EMAHook", priority="HIGHEST")]
    runner = make_runner(cfg)
    runner.call_hook("before_run")
    hook = fused_hook(runner)
    assert swapped(hook.model_replaced) == SWAPPED_T
    assert len(hook.replaced) == 2 * 27  # the model and the EMA copy
    model = model_of(runner).eval()

    clone = copy.deepcopy(model)
    assert isinstance(clone.backbone.block2[0].attn.spatial_gating_unit, sk.MSCA)
    assert clone.state_dict().keys() == model.state_dict().keys()
    p, q = model.backbone.block1[0].mlp.fc1.weight, clone.backbone.block1[0].mlp.fc1.weight
    assert p is not q and torch.equal(p, q)
    x = torch.randn(1, 3, SIDE, SIDE)
    with torch.no_grad():
        torch.manual_seed(1)
        want = model(x, mode="tensor")
        torch.manual_seed(1)
        got = clone(x, mode="tensor")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    runner.call_hook("after_run")


@needs_mmseg
def test_hook_found_from_mmseg_scope_and_bad_arguments():
    from mmengine.registry import HOOKS, DefaultScope
    from segnext_kernels.mmseg import SegNeXtKernelsHook
    from mmseg.registry import HOOKS as MMSEG_HOOKS
    assert HOOKS.get("SegNeXtKernelsHook") is SegNeXtKernelsHook
    with DefaultScope.overwrite_default_scope("mmseg"):
        hook = MMSEG_HOOKS.build(dict(type="SegNeXtKernelsHook", backend="CPU"))
    assert isinstance(hook, SegNeXtKernelsHook) and hook.backend == "cpu"
    with pytest.raises(ValueError, match="backend must be None or one of"):
        SegNeXtKernelsHook(backend="gpu")
    with pytest.raises(TypeError, match="backend must be None or a str"):
        SegNeXtKernelsHook(backend=1)
    with pytest.raises(TypeError, match="msca must be a bool"):
        SegNeXtKernelsHook(msca="yes")
    with pytest.raises(ValueError, match="nmf_grad must be one of"):
        SegNeXtKernelsHook(nmf_grad="exact")


@needs_mmseg
def test_unavailable_backend_is_refused_at_before_run(workspace, tmp_path):
    import segnext_kernels as sk
    if sk.available_backends()["cuda"].available:
        pytest.skip("cuda is available here")
    cfg = make_cfg(workspace, tmp_path / "cuda", fused=True, val=False, backend="cuda")
    runner = make_runner(cfg)
    with pytest.raises((RuntimeError, ValueError), match="cuda"):
        runner.call_hook("before_run")
    assert sk.get_backend() == "auto"


@needs_mmseg
def test_model_without_segnext_modules_warns():
    from segnext_kernels.mmseg import SegNeXtKernelsHook

    class FakeRunner:
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1))
        hooks = []

        class logger:
            messages = []

            @classmethod
            def warning(cls, m):
                cls.messages.append(("warning", m))

            @classmethod
            def info(cls, m):
                cls.messages.append(("info", m))

    hook = SegNeXtKernelsHook()
    hook.before_run(FakeRunner)
    assert hook.replaced == []
    (level, message), = FakeRunner.logger.messages
    assert level == "warning" and "runs unchanged" in message


@needs_mmseg
def test_mmcv_lite_stand_in():
    from segnext_kernels.mmseg.mmcv_lite import STUB_MARK, stub_mmcv_ops
    stubbed = stub_mmcv_ops()
    import mmcv.ops
    if not stubbed:  # full mmcv with compiled ops: left alone
        assert not getattr(mmcv.ops, STUB_MARK, False)
        return
    assert stub_mmcv_ops() is True and getattr(mmcv.ops, STUB_MARK)  # idempotent
    with pytest.raises(ModuleNotFoundError, match="mmcv-lite has no compiled ops"):
        from mmcv.ops import CrissCrossAttention  # noqa: F401  (mmseg's optional imports)
    with pytest.raises(NotImplementedError, match="needs mmcv built with its compiled ops"):
        mmcv.ops.point_sample(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2))
    assert not hasattr(mmcv.ops, "__path__")  # dunder probes get AttributeError, not a raise
    import mmseg.models  # noqa: F401  (what the stand-in is for)


@needs_mmseg
def test_distributed_launcher_two_processes(workspace, tmp_path):
    """torch.distributed.run (what mmseg's tools/dist_train.sh runs) with 2 CPU processes,
    launcher='pytorch', DDP over gloo: each rank swaps 27 modules inside the DDP wrapper and
    trains; losses match the unswapped run of the same rank and parameters stay in sync."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + env.get("PYTHONPATH", "").split(os.pathsep))
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(29500 + os.getpid() % 1000), str(Path(__file__)),
           "--ddp-worker", str(tmp_path), str(workspace)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, res in enumerate(results):
        assert res["world_size"] == 2 and res["rank"] == r and res["wrapped"]
        assert res["swapped"] == {f"{a} -> {b}": n for (a, b), n in SWAPPED_T.items()}
        np.testing.assert_allclose(res["fused_losses"], res["eager_losses"], rtol=2e-5)
        assert len(res["fused_losses"]) == 2
    # each rank trained on its own data, and DDP averaged the gradients of the swapped modules
    # (hooked on the same parameter objects): both ranks hold the same, updated weights
    assert results[0]["fused_losses"] != results[1]["fused_losses"]
    for res in results:
        assert res["max_update"] > 1e-5
        assert res["max_diff_between_ranks"] == 0.0


def _ddp_worker(out_dir: Path, workspace: Path) -> None:
    """One rank of test_distributed_launcher_two_processes."""
    import torch.distributed as dist
    # mmengine's own init_dist('pytorch') calls torch.cuda.set_device, which a CPU-only torch
    # lacks: the process group is made here (gloo), and the Runner, seeing it, uses it.
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    losses = {}
    for fused in (False, True):
        cfg = make_cfg(workspace, out_dir / f"ddp_{fused}", fused=fused, iters=2, val=False,
                       ckpt_interval=100)
        cfg.launcher = "pytorch"
        # DDP on CPU modules takes no device_ids (mmengine's default passes LOCAL_RANK)
        cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None,
                                     broadcast_buffers=False, find_unused_parameters=False)
        runner, rec, _ = run(cfg)
        losses[fused] = rec.losses
    from mmengine.model import is_model_wrapper
    hook = fused_hook(runner)
    params = dict(model_of(runner).named_parameters())
    flat = torch.cat([p.detach().flatten() for p in params.values()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    max_update = max(float((params[n] - p0).abs().max()) for n, p0 in rec.initial.items())
    result = dict(rank=rank, world_size=dist.get_world_size(),
                  wrapped=is_model_wrapper(runner.model),
                  swapped={f"{a} -> {b}": n for (a, b), n in swapped(hook.model_replaced).items()},
                  eager_losses=losses[False], fused_losses=losses[True], max_update=max_update,
                  max_diff_between_ranks=max(float((g - flat).abs().max()) for g in gathered))
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__" and sys.argv[1:2] == ["--ddp-worker"]:
    _ddp_worker(Path(sys.argv[2]), Path(sys.argv[3]))
