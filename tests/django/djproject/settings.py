"""A minimal Django project for the idemtask tests; configured by ``DJTEST_*`` variables."""

import os

SECRET_KEY = "test-only"
DEBUG = False
USE_TZ = True
INSTALLED_APPS = ["shop"]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": os.environ["DJTEST_DB"]}}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
CELERY_BROKER_URL = os.environ["DJTEST_BROKER"]
CELERY_RESULT_BACKEND = os.environ["DJTEST_BACKEND"]
# The store is named only here: the worker and the idemtask CLI must both read it.
IDEMTASK = {"redis_url": os.environ["DJTEST_STORE"], "lease": 20}
