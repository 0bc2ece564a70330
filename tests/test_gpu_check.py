"""tools/gpu_check.sh, the prepared first-GPU-run check, on what runs without a GPU: its dry run
(every stage's command, the test files collect, every bench filter selects something), and the
stage machinery -- a stage forced past its time limit is recorded as a timeout and the next
stage still runs, with logs and JSON under OUTDIR."""
from __future__ import annotations

import json
import os
import re
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def run(args, tmp_path, **env):
    e = dict(os.environ, PYTHON=sys.executable, **env)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env=e)


def test_dry_run_lists_every_stage_and_checks_them(tmp_path):
    r = run(["--dry-run", str(tmp_path / "out")], tmp_path, GPU_CHECK_BUDGET="300")
    log = r.stdout + r.stderr
    assert r.returncode == 0, log
    for stage in ("env", "build", "selftest", "gpu-tests", "sanitize-memcheck", "sanitize-racecheck",
                  "bench-fp16", "bench-bf16", "bench-compile"):
        assert f"== {stage} (min" in log, stage
    # a stage's limit leaves the later stages their minimums: the build gets 300 - 210 s (its max is
    # 150), the GPU tests 300 - 160 s (max 150), less the second or two already spent
    limits = dict(re.findall(r"== (\S+) \(min \d+s, max \d+s, limit now (\d+)s\)", log))
    assert 88 <= int(limits["build"]) <= 90 and 138 <= int(limits["gpu-tests"]) <= 140, limits
    assert "imports: ok" in log and "gpu tests collect:" in log
    assert log.count(" variants") == 3 and "no variant" not in log
    assert not (tmp_path / "out" / "stages.jsonl").exists()  # a dry run runs nothing


def test_a_timed_out_stage_is_recorded_and_the_next_one_runs(tmp_path):
    out = tmp_path / "out"
    r = run(["--only", "env,bench-bf16,selftest", str(out)], tmp_path, GPU_CHECK_TIMEOUT_bench_bf16="3")
    log = r.stdout + r.stderr
    assert r.returncode == 1, log  # a timeout is a failure of the check
    stages = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]
    assert [s["stage"] for s in stages] == ["env", "selftest", "bench-bf16"]
    by = {s["stage"]: s for s in stages}
    assert by["env"]["status"] == "ok" and (out / "env.json").exists()
    assert by["selftest"]["status"] in ("ok", "absent")
    assert by["bench-bf16"]["status"] == "timeout" and by["bench-bf16"]["limit_s"] == 3
    assert by["bench-bf16"]["seconds"] < 3 + 15  # SIGINT at the limit, SIGKILL 10 s later at most
    assert (out / "bench-bf16.log").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["env", "selftest", "bench-bf16"]
    assert "bench-bf16" in (out / "summary.txt").read_text()
