"""The run configuration: typed keys with a help line each, flat YAML plus ``key=value``, validation that reports
every error at once.

``keys`` (:class:`TrainConfig` and the values each key allows), ``parse`` (YAML, overrides, the Trainer's names as
aliases, coercion, :func:`build_config`, config.yaml) and ``checks`` (:func:`validate`, one check per concern). It
imports ``base`` only, so every other floor can read a configuration; what needs the model or the method table's
builders (gamma against the blocks, the known methods) is passed in by the caller.
"""

from .checks import ConfigError, ignored_keys_warning, non_finite_errors, parse_size, validate
from .keys import (ALIAS_VALUES, ALIASES, ATTN_IMPLEMENTATIONS, AUTO_KEYS, BEST_METRICS, DATA_FILE_SUFFIXES,
                   DATA_FORMATS, DEFAULT_MAX_STEPS, DTYPES, HOLDOUT, LR_SCHEDULES, PAPER_LAYOUT, PAPER_PROBE, REPORT_TO,
                   SAMPLING_KEYS, SAVE_DTYPES, TrainConfig, holds_out, lora_targets)
from .parse import (_coerce, _field_types, build_config, parse_overrides, resolve_aliases, save_config,
                    unknown_key_message)

__all__ = ["ALIAS_VALUES", "ALIASES", "ATTN_IMPLEMENTATIONS", "AUTO_KEYS", "BEST_METRICS", "DATA_FILE_SUFFIXES",
           "DATA_FORMATS", "DEFAULT_MAX_STEPS", "DTYPES", "HOLDOUT", "LR_SCHEDULES", "PAPER_LAYOUT", "PAPER_PROBE",
           "REPORT_TO", "SAMPLING_KEYS", "SAVE_DTYPES", "ConfigError", "TrainConfig", "_coerce", "_field_types",
           "build_config", "holds_out", "ignored_keys_warning", "lora_targets", "non_finite_errors", "parse_overrides",
           "parse_size", "resolve_aliases", "save_config", "unknown_key_message", "validate"]
