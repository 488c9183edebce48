"""``tyingrun``: the Hydra app. Bad input of any kind ends in one line on stderr and exit status 2."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from tyingrun.config import register_configs, reject_unknown_keys, unknown_key_message
from tyingrun.errors import BadInput

EXIT_BAD_INPUT = 2


def explain(err: BaseException) -> str:
    """One line for a composition or validation error: what is wrong, and what is allowed."""
    cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
    if isinstance(err, MissingConfigException) and err.options is not None:
        group = (err.missing_cfg_file or "").rpartition("/")[0]
        option = (err.missing_cfg_file or "").rpartition("/")[2]
        return f"unknown option {group}={option}; choose one of: {', '.join(sorted(err.options))}"
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and getattr(cause, "full_key", None):
        return unknown_key_message(cause.full_key)
    if isinstance(cause, ValidationError) and getattr(cause, "full_key", None):
        message = str(cause).splitlines()[0]
        return f"bad value for {cause.full_key}: {message}"
    return " ".join(str(err).split())


def fail(message: str) -> NoReturn:
    sys.stderr.write(f"tyingrun: error: {message}\n")
    sys.exit(EXIT_BAD_INPUT)


@hydra.main(version_base="1.3", config_path="pkg://tyingrun.conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> float:
    from tyingrun.run import run

    try:
        reject_unknown_keys(cfg)
        summary = run(OmegaConf.to_object(cfg), Path(HydraConfig.get().runtime.output_dir))
    except BadInput as err:
        if HydraConfig.get().mode == RunMode.RUN:
            fail(str(err))
        raise
    return summary["val_loss"]


def main() -> None:
    # Let exceptions reach us instead of Hydra's multi-line report, so each becomes one line.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    register_configs()
    try:
        _hydra_main()
    except (HydraException, ConfigKeyError, ConfigAttributeError, ValidationError) as err:
        fail(explain(err))


if __name__ == "__main__":
    main()
