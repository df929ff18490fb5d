"""Prefect flows: one flow per file; a flow body only calls tasks."""
