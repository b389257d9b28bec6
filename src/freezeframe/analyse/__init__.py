"""Analyse: pure functions from a stored run to tables, the summary and the findings."""
