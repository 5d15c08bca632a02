"""What ``pip install idemtask`` gets: the library alone, its license and valid metadata.

The wheel and the sdist are built from a copy of the repository (as a release would be)
and checked with the tools a package index applies.
"""

from __future__ import annotations

import email
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Not part of a release's source: version control, caches and earlier build output.
LEFT_OUT = (".git", ".tox", ".venv", ".hypothesis", ".benchmarks", ".*_cache", "__pycache__")
LEFT_OUT += ("*.egg-info", "build", "dist", "site")


#: A Markdown link or image whose target is not an absolute URL.
_RELATIVE_LINK = re.compile(r"\]\((?!https?://)[^)]*\)")
_CODE_BLOCK = re.compile(r"^```[a-z]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
#: The one example of the index page that the README has no need for.
_DOCS_DOWNLOAD = "pip download idemtask --no-binary :all: --no-deps && tar xzf idemtask-*.tar.gz\n"


def _code_blocks(markdown: str) -> set[str]:
    return set(_CODE_BLOCK.findall(markdown))


def _run(*command: str, cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", *command],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode == 0, f"{' '.join(command)}:\n{output}"
    return done.stdout


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_wheel_and_sdist_hold_the_library_its_license_and_valid_metadata(
    tmp_path: Path,
) -> None:
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*LEFT_OUT))
    out = tmp_path / "dist"
    _run("build", "--outdir", str(out), str(source), cwd=tmp_path)
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    version = wheel.name.split("-")[1]

    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        dist_info = f"idemtask-{version}.dist-info"
        metadata = email.message_from_bytes(archive.read(f"{dist_info}/METADATA"))
    with tarfile.open(sdist) as archive:
        members = archive.getnames()

    assert {name.split("/")[0] for name in names} == {"idemtask", f"idemtask-{version}.dist-info"}
    assert f"{dist_info}/licenses/LICENSE" in names
    assert "idemtask/py.typed" in names
    assert any(name.startswith("idemtask/store/lua/") for name in names)
    assert "idemtask/contrib/grafana-dashboard.json" in names
    assert "idemtask/testing/launcher.py" in names
    assert "idemtask/testing/servers.py" not in names  # the suite's launchers stay in tests/

    description = metadata.get_payload()
    assert isinstance(description, str) and "## Quick start" in description
    assert not _RELATIVE_LINK.findall(description), "a link that is dead on an index page"
    assert _code_blocks(description) - _code_blocks((ROOT / "README.md").read_text()) == {
        _DOCS_DOWNLOAD
    }, "the index page's examples drifted from the README's"

    assert metadata["License-Expression"] == "MIT"
    assert not [c for c in metadata.get_all("Classifier", []) if c.startswith("License ::")]
    requires = metadata.get_all("Requires-Dist", [])
    assert any(r.startswith("celery[redis]") and 'extra == "celery"' in r for r in requires)
    # the chaos runner's progress bar: an extra, never a dependency of the library itself
    rich = [r for r in requires if r.startswith("rich")]
    assert any('extra == "testing"' in r for r in rich), rich
    assert all("extra ==" in r for r in rich), rich

    assert f"idemtask-{version}/LICENSE" in members
    # the docs the package index page points to, and what builds them into a site
    assert f"idemtask-{version}/docs/guarantees.md" in members
    assert f"idemtask-{version}/mkdocs.yml" in members
    assert not [m for m in members if m.startswith(f"idemtask-{version}/benchmarks")]

    _run("twine", "check", "--strict", str(wheel), str(sdist), cwd=tmp_path)
    _run("check_wheel_contents", str(wheel), cwd=tmp_path)
