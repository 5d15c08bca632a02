"""A misspelt idemtask option is refused where Celery creates the task class, with the name
it most likely meant; it is never an ignored attribute with the default silently applied."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from celery import Celery, Task

from idemtask.celery import IdempotentTask, check_app
from idemtask.errors import ConfigurationError
from idemtask.findings import Level

pytestmark = pytest.mark.celery

DID_YOU_MEAN = r"idempotency_kye \(did you mean idempotency_key\?\)"


def _app(**kwargs: object) -> Celery:
    return Celery("options", broker="memory://", set_as_current=False, **kwargs)  # type: ignore[arg-type]


def test_a_misspelt_option_is_refused_when_the_task_is_created() -> None:
    app = _app(task_cls=IdempotentTask)
    with pytest.raises(ConfigurationError, match=rf"task options\.charge: .*{DID_YOU_MEAN}"):

        @app.task(shared=False, lazy=False, name="options.charge", idempotency_kye=("order_id",))
        def charge(order_id: str, amount: int) -> int:
            return amount

    assert "options.charge" not in app.tasks


def test_a_lazy_task_is_refused_when_the_app_finalizes_and_on_first_use() -> None:
    """Celery creates a task's class when the app finalizes (worker start, ``app.tasks``) or
    the task is first used, not at ``@app.task``: that is where the error is raised."""
    app = _app(task_cls=IdempotentTask)

    @app.task(shared=False, name="options.lazy", idempotency_kye=("order_id",))
    def charge(order_id: str, amount: int) -> int:
        return amount

    with pytest.raises(ConfigurationError, match=DID_YOU_MEAN):
        app.finalize()
    with pytest.raises(ConfigurationError, match=DID_YOU_MEAN):
        charge.delay("o1", 10)
    assert "options.lazy" not in app.tasks


def test_base_and_subclasses_are_checked_too() -> None:
    app = _app()  # a plain app: the task opts in with base=
    with pytest.raises(ConfigurationError, match=r"leese \(did you mean lease\?\)"):

        @app.task(shared=False, lazy=False, base=IdempotentTask, leese=30)
        def charge(order_id: str) -> None: ...

    with pytest.raises(ConfigurationError, match=r"on_runing \(did you mean on_running\?\)"):

        class Charging(IdempotentTask):  # type: ignore[misc]
            on_runing = "wait"

    # Dramatiq spells it idempotency_result_ttl; a Celery task is told its own spelling.
    with pytest.raises(ConfigurationError, match=r"did you mean result_ttl\?"):

        @app.task(shared=False, lazy=False, base=IdempotentTask, idempotency_result_ttl=60)
        def mail(to: str) -> None: ...


def test_other_options_and_attributes_pass() -> None:
    app = _app(task_cls=IdempotentTask)

    @app.task(
        shared=False,
        lazy=False,
        name="options.fine",
        idempotency_key=("order_id",),
        lease=30,
        autoretry_for=(KeyError,),
        retry_backoff=True,
        time_limit=60,
        max_retries=3,
        tenant="shop",  # a project's own option, unlike any idemtask option
    )
    def charge(order_id: str, amount: int) -> int:
        return amount

    assert charge.idemtask_policy().idempotency_key == ("order_id",)

    class Audited(IdempotentTask):  # type: ignore[misc]
        audit_channel = "billing"

        def before_start(self, task_id: str, args: object, kwargs: object) -> None: ...

    assert issubclass(Audited, Task)

    class Leasing(IdempotentTask):  # type: ignore[misc]
        """Methods and properties of a task class are its own code, whatever their names."""

        def release(self) -> None: ...

        @property
        def leese(self) -> int:
            return 0

        @staticmethod
        def on_runing() -> None: ...

    assert issubclass(Leasing, Task)
    # The same names as plain values would be decorator options: refused.
    with pytest.raises(ConfigurationError, match=r"release \(did you mean lease\?\)"):

        class Misspelt(IdempotentTask):  # type: ignore[misc]
            release = 30


def test_doctor_reports_the_misspelling(tmp_path: Path) -> None:
    app = _app(task_cls=IdempotentTask)

    @app.task(shared=False, name="options.doctor", idempotency_kye=("order_id",))
    def charge(order_id: str) -> None: ...

    findings = {f.code: f for f in check_app(app)}
    finding = findings["celery.task_options"]
    assert finding.level is Level.ERROR
    assert "did you mean idempotency_key?" in finding.message
    assert "options valid" not in finding.message


SHOP = """
from celery import Celery
from idemtask.celery import IdempotentTask

app = Celery("shop", broker="memory://", task_cls=IdempotentTask)

@app.task(idempotency_kye=("order_id",))
def charge(order_id, amount):
    return amount
"""


def test_the_doctor_command_and_a_worker_refuse_it(tmp_path: Path) -> None:
    (tmp_path / "shop_typo.py").write_text(textwrap.dedent(SHOP))
    doctor = subprocess.run(
        [sys.executable, "-m", "idemtask", "doctor", "--celery", "shop_typo:app"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    assert (
        "[ERROR] celery.task_options: task shop_typo.charge: unknown idemtask option(s) "
        "idempotency_kye (did you mean idempotency_key?)" in doctor.stdout
    )
    assert "options valid" not in doctor.stdout
    worker = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "shop_typo", "worker", "--pool=solo"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert worker.returncode != 0
    assert "did you mean idempotency_key?" in worker.stderr
    assert "ready." not in worker.stdout + worker.stderr
