"""Run configuration: typed schema, YAML loading with a defaults list, dot-list overrides, validation."""

from .loader import available_configs, configs_dir, load_config, to_yaml
from .schema import StudioConfig

__all__ = ["StudioConfig", "available_configs", "configs_dir", "load_config", "to_yaml"]
