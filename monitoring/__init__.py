"""Observability as code: the dashboard and alert generators and their generated outputs."""
