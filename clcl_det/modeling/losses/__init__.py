"""Continual losses."""
