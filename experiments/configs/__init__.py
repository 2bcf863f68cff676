"""Experiment configs: modules with a ``get_config()`` read by ``ml_collections.config_flags``."""
