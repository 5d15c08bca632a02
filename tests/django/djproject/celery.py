"""The project's Celery app, as Celery's Django guide sets it up, with idemtask's task class."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djproject.settings")

app = Celery("djproject", task_cls="idemtask.celery:IdempotentTask")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
