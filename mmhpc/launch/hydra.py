"""Hydra composition without @hydra.main (which would chdir per rank).

The typed `Config` is registered in Hydra's ConfigStore as `mmhpc_schema`; `conf/config.yaml`
lists it first in its defaults, so every YAML file and command-line override is merged into
typed, struct-mode nodes (an unknown key or ill-typed value fails composition).
`compose_config` then builds plain dataclasses, whose `__post_init__` validates values.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mmhpc.config import Config

SCHEMA_NAME = "mmhpc_schema"


class ConfigError(ValueError):
    """A bad override, key or value; the message is one line."""


def conf_dir() -> Path:
    env = os.environ.get("MMHPC_CONF_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "conf"


def _register() -> None:
    from hydra.core.config_store import ConfigStore
    ConfigStore.instance().store(name=SCHEMA_NAME, node=Config)


def compose_dictconfig(overrides: list[str] = ()) -> Any:
    """The merged DictConfig (for `--cfg job`); raises ConfigError."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    _register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            return compose(config_name="config", overrides=list(overrides))
    except Exception as e:  # Hydra/OmegaConf raise many types; the user needs one line
        raise ConfigError(_one_line(e)) from None


def compose_config(overrides: list[str] = ()) -> Config:
    return to_config(compose_dictconfig(overrides))


def to_config(cfg: Any) -> Config:
    try:
        return Config.from_dictconfig(cfg)
    except (ValueError, TypeError) as e:
        raise ConfigError(_one_line(e)) from None


def _one_line(e: BaseException) -> str:
    """Hydra wraps the OmegaConf error that names the key; say both on one line."""
    first = _first_line(e)
    cause = e.__cause__
    if cause is not None and _first_line(cause) not in first:
        first = f"{first.rstrip('.')}: {_first_line(cause)}"
    options = _options(str(e))
    return f"{first} (options: {options})" if options else first


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0].strip() if lines else type(e).__name__


def _options(msg: str) -> str:
    """Hydra lists a group's options after 'Available options in ...:' one per tab line."""
    if "Available options" not in msg:
        return ""
    tail = msg.split("Available options", 1)[1].splitlines()[1:]
    return ", ".join(ln.strip() for ln in tail if ln.startswith("\t") and "=" not in ln
                     and not ln.strip().startswith("provider"))
