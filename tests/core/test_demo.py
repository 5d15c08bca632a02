"""The README's main job: the demos run, and their checks hold, in-process and on Redis."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

CHECKS = {
    "dramatiq": [
        "[ok] duplicate send returns the original message",
        "[ok] order 1 charged once",
        "[ok] redelivered completed message replayed, not run",
        "[ok] busy copy deferred, then replayed; order 3 charged once",
        "[ok] crashed holder taken over after its lease; order 4 charged once",
    ],
    "celery": [
        "[ok] duplicate call returns the original task id",
        "[ok] order 1 charged once",
        "[ok] redelivered completed message replayed, not run",
        "[ok] order 1 still charged once",
    ],
}


def demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "idemtask", "demo", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("on_redis", [False, True], ids=["memory", "redis"])
def test_demo_runs_and_every_check_holds(on_redis: bool, request: pytest.FixtureRequest) -> None:
    args = ["--redis", request.getfixturevalue("redis_url")] if on_redis else []
    out = demo(*args)
    assert out.returncode == 0, out.stdout + out.stderr
    for line in CHECKS["dramatiq"]:
        assert line in out.stdout
    assert "FAILED" not in out.stdout
    assert "body runs: 3" in out.stdout
    assert "idemtask: takeover" in out.stdout and "idemtask: deferred" in out.stdout
    if on_redis:
        assert "store on redis://" in out.stdout
    else:
        assert "MemoryStore" in out.stdout


@pytest.mark.parametrize("framework", ["celery", "dramatiq"])
def test_each_framework_demo_runs_without_a_server(framework: str) -> None:
    out = demo(f"--{framework}")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"a {framework.capitalize()} worker, idemtask's store on the embedded" in out.stdout
    for line in CHECKS[framework]:
        assert line in out.stdout
    assert "FAILED" not in out.stdout
    assert "idemtask: duplicate" in out.stdout and "idemtask: replayed" in out.stdout


def test_celery_demo_on_redis_records_there(redis_url: str) -> None:
    out = demo("--celery", "--redis", redis_url)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "store on redis://" in out.stdout and "body runs: 1" in out.stdout


BLOCKED = textwrap.dedent(
    """
    import sys

    class Missing:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {blocked!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}")
            return None

    sys.meta_path.insert(0, Missing())
    from idemtask.cli import main
    main({argv!r}, prog_name="idemtask")
    """
)


def without(blocked: list[str], *argv: str) -> subprocess.CompletedProcess[str]:
    """Run the command in a Python where the ``blocked`` packages cannot be imported."""
    script = BLOCKED.format(blocked=blocked, argv=list(argv))
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("module,name", [("celery", "Celery"), ("dramatiq", "Dramatiq")])
def test_a_demo_without_its_framework_names_the_extra(module: str, name: str) -> None:
    out = without([module], "demo", f"--{module}")
    assert out.returncode == 2
    assert out.stderr == f"error: the {name} demo needs {name}: pip install 'idemtask[{module}]'\n"
    assert out.stdout == ""


def test_the_default_demo_runs_the_framework_installed() -> None:
    out = without(["dramatiq"], "demo")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "a Celery worker, idemtask's store on the embedded" in out.stdout
    neither = without(["dramatiq", "celery"], "demo")
    assert neither.returncode == 2
    assert neither.stderr == (
        "error: the demo needs Dramatiq or Celery: pip install 'idemtask[dramatiq]' or "
        "pip install 'idemtask[celery]'\n"
    )
