"""Helpers shared by the framework integrations (freezeframe.fastai, freezeframe.lightning)."""
