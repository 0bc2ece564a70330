"""The supported Triton range: one declaration (segnext_kernels/_triton_compat.py) that
pyproject.toml, requirements-dev.txt, the README and the CI matrix (tools/triton_matrix.sh)
repeat."""
import os
import re

from segnext_kernels import _triton_compat as compat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLDEST = "{}.{}".format(*compat.OLDEST)
NEWEST = "{}.{}".format(*compat.NEWEST)
# pip's spelling of the range: from the oldest minor up to, not including, the next minor
PIP_RANGE = f"triton>={OLDEST},<{compat.NEWEST[0]}.{compat.NEWEST[1] + 1}"


def _read(name: str) -> str:
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def test_parse_version():
    assert compat.parse_version("3.6.0") == (3, 6)
    assert compat.parse_version("3.10.1+git1a2b3c") == (3, 10)
    assert compat.parse_version("unknown") is None


def test_range_bounds():
    assert compat.in_supported_range(f"{OLDEST}.0")
    assert compat.in_supported_range(f"{NEWEST}.1")
    assert not compat.in_supported_range("3.4.0")
    assert not compat.in_supported_range(f"{compat.NEWEST[0]}.{compat.NEWEST[1] + 1}.0")
    assert not compat.in_supported_range("not a version")
    assert "outside the supported range" in compat.support_status("3.4.0")
    assert compat.support_status(f"{OLDEST}.0").startswith("in the supported range")


def test_pyproject_and_requirements_declare_the_range():
    pyproject = _read("pyproject.toml")
    for extra in ("triton", "test"):  # the optional-dependency lists
        deps = re.search(rf"^{extra} = \[(.*)\]", pyproject, re.M).group(1)
        assert f'"{PIP_RANGE}"' in deps, (extra, deps)
    lines = [line.strip() for line in _read("requirements-dev.txt").splitlines()]
    assert PIP_RANGE in lines


def test_readme_states_the_range():
    assert f"Supported Triton: {OLDEST} to {NEWEST}" in _read("README.md")


def test_ci_matrix_covers_every_supported_minor():
    versions = re.search(r"^VERSIONS=\(([^)]*)\)", _read("tools/triton_matrix.sh"), re.M)
    minors = [compat.parse_version(v) for v in versions.group(1).split()]
    expected = [(compat.OLDEST[0], m) for m in range(compat.OLDEST[1], compat.NEWEST[1] + 1)]
    assert minors == expected
