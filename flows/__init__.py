"""Prefect flows: compress.py is the six-stage DAG."""
