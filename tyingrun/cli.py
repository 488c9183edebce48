"""``tyingrun``: the Hydra app. Bad input of any kind ends in one line on stderr and exit status 2."""

from __future__ import annotations

import difflib
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import NoReturn, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from tyingrun.config import SECTION_SCHEMAS, register_configs
from tyingrun.errors import BadInput

EXIT_BAD_INPUT = 2


def _allowed_keys(full_key: str) -> Optional[str]:
    section = full_key.split(".")[0]
    schema = SECTION_SCHEMAS.get(section)
    if schema is None:
        return None
    names = [f"{section}.{f.name}" for f in fields(schema)]
    close = difflib.get_close_matches(full_key, names, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"{hint}{section} accepts: {', '.join(f.name for f in fields(schema))}"


def explain(err: BaseException) -> str:
    """One line for a composition or validation error: what is wrong, and what is allowed."""
    cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
    if isinstance(err, MissingConfigException) and err.options is not None:
        group = (err.missing_cfg_file or "").rpartition("/")[0]
        option = (err.missing_cfg_file or "").rpartition("/")[2]
        return f"unknown option {group}={option}; choose one of: {', '.join(sorted(err.options))}"
    if isinstance(cause, ConfigKeyError) and getattr(cause, "full_key", None):
        allowed = _allowed_keys(cause.full_key)
        known = f"; {allowed}" if allowed else f"; sections are: {', '.join(SECTION_SCHEMAS)}"
        return f"unknown config key {cause.full_key}{known}"
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

    typed = OmegaConf.to_object(cfg)
    summary = run(typed, Path(HydraConfig.get().runtime.output_dir))
    return summary.get("val_loss", float("nan"))


def main() -> None:
    # Let exceptions reach us instead of Hydra's multi-line report, so each becomes one line.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    register_configs()
    try:
        _hydra_main()
    except BadInput as err:
        fail(str(err))
    except (MissingConfigException, ConfigCompositionException, OverrideParseException) as err:
        fail(explain(err))
    except (ConfigKeyError, ValidationError) as err:
        fail(explain(err))
    except HydraException as err:
        fail(explain(err))


if __name__ == "__main__":
    main()
