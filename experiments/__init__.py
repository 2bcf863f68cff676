"""Experiment launchers (absl apps) and their ``get_config()`` files."""
