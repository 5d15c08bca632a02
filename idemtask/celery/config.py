"""Where a Celery task's idemtask policy comes from: the task's own options over
``app.conf.idemtask`` over Django ``settings.IDEMTASK`` over ``IDEMTASK_*`` variables."""

from __future__ import annotations

import inspect
import threading
import weakref
from collections.abc import Mapping
from typing import Any

from celery import Celery, Task

from idemtask.celery.codec import CelerySerializerCodec
from idemtask.config import Settings, resolve_settings
from idemtask.errors import ConfigurationError
from idemtask.identity import Identity, identify
from idemtask.policy import POLICY_OPTIONS, check_option_names

CONF_NAME = "idemtask"
#: Celery's own tasks (chord_unlock, backend_cleanup, ...) are never guarded, even when
#: ``task_cls=IdempotentTask`` makes every task of the app an IdempotentTask.
BUILTIN_PREFIX = "celery."

_UNSET: Any = object()
_lock = threading.Lock()
_settings: weakref.WeakKeyDictionary[Celery, tuple[dict[str, Any], Settings]] = (
    weakref.WeakKeyDictionary()
)
_codecs: dict[str, CelerySerializerCodec] = {}


def app_conf(app: Celery) -> Mapping[str, Any]:
    """``app.conf.idemtask``, the app's layer of settings (empty when unset)."""
    raw = app.conf.get(CONF_NAME) or {}
    if not isinstance(raw, Mapping):
        raise ConfigurationError(f"app.conf.{CONF_NAME} must be a dict, got {type(raw).__name__}")
    return raw


def app_settings(app: Celery) -> Settings:
    """The app's resolved settings, recomputed only when ``app.conf.idemtask`` changes."""
    raw = app_conf(app)
    with _lock:
        cached = _settings.get(app)
        if cached is not None and cached[0] == raw:
            return cached[1]
    settings = resolve_settings(framework=raw, framework_name=f"app.conf.{CONF_NAME}")
    with _lock:
        _settings[app] = (dict(raw), settings)
    return settings


def task_options(task_class: type[Task]) -> dict[str, Any]:
    """The policy options declared on the task class (decorator kwargs become attributes).

    Read statically so a callable ``idempotency_key`` is the function itself, not a method
    bound to the task: users need not wrap it in ``staticmethod``.
    """
    options: dict[str, Any] = {}
    for name in POLICY_OPTIONS:
        value = inspect.getattr_static(task_class, name, _UNSET)
        if value is _UNSET:
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        options[name] = value
    return options


def check_task_class(task_class: type[Task]) -> None:
    """Refuse a task class whose own attributes include a misspelt idemtask option.

    Decorator options become class attributes of the generated class, so a misspelling
    (``idempotency_kye``) would be an attribute nobody reads and the option's default would
    apply silently. Names a base class defines (Celery's own options, methods) are skipped,
    and so are names unlike any idemtask option (other options a project gives its tasks).
    """
    inherited = task_class.__mro__[1:]
    own = [
        name
        for name, value in vars(task_class).items()
        if not any(name in vars(b) for b in inherited) and not defined_in(task_class, value)
    ]
    label = vars(task_class).get("name") or f"{task_class.__module__}.{task_class.__qualname__}"
    check_option_names(own, source=f"task {label}")


def defined_in(task_class: type[Task], value: Any) -> bool:
    """A method or property written in the class body (``def release(self)``) is the class's
    own code, not a decorator option, however close its name is to one."""
    if isinstance(value, property):
        return True
    function = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
    qualname = getattr(function, "__qualname__", "")
    return isinstance(qualname, str) and qualname.startswith(f"{task_class.__qualname__}.")


def task_identity(task: Task, settings: Settings | None = None) -> Identity | None:
    """The task's identity (name, function, validated policy), or None when it is not
    guarded (``idempotent=False`` or one of Celery's own tasks). Cached on the task class
    per settings object; pass ``settings`` when the caller has them already."""
    task_class = type(task)
    if settings is None:
        settings = app_settings(task.app)
    cached = task_class.__dict__.get("_idemtask_cached")
    if cached is not None and cached[0] is settings:
        identity: Identity | None = cached[1]
        return identity
    identity = resolve_identity(task, settings)
    type.__setattr__(task_class, "_idemtask_cached", (settings, identity))
    return identity


def resolve_identity(task: Task, settings: Settings) -> Identity | None:
    """Merge and validate, raising ConfigurationError that names the task. A task that does
    not type-check its calls (``typing=False``) keys the calls Celery accepts from it."""
    name = task.name or f"{type(task).__module__}.{type(task).__qualname__}"
    if name.startswith(BUILTIN_PREFIX):
        return None
    options = task_options(type(task))
    return identify(name, task.run, settings.defaults, options, strict=bool(task.typing))


def codec_for(app: Celery) -> CelerySerializerCodec:
    """One codec per result serializer: the one the app's result backend uses."""
    serializer = str(app.conf.result_serializer or "json")
    codec = _codecs.get(serializer)
    if codec is None:
        codec = _codecs[serializer] = CelerySerializerCodec(serializer)
    return codec
