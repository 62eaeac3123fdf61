"""Celery workers: the app (``celery_app``), tasks per queue (``tasks``), job helpers (``jobctl``)."""
