"""Prefect Block classes: configuration and secrets only, no workflow logic."""
