"""Celery workers: the clone workflow and environment lifecycle tasks."""
