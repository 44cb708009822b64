"""kdx: config-driven knowledge distillation on Lightning + Hydra."""

# The one place the version is written: pyproject.toml reads it (dynamic version).
__version__ = "0.1.0"

# Optuna's direction follows the one monitor setting (conf/hparams_search/_optuna.yaml); registered
# here so that any composition of kdx's configs (entry points, tests, user scripts) can resolve it.
from omegaconf import OmegaConf as _OmegaConf  # noqa: E402

_OmegaConf.register_new_resolver(
    "kdx.optuna_direction", lambda mode: "minimize" if str(mode) == "min" else "maximize", replace=True
)

# The config options kdx generates instead of one file each (student=<model>, method=<name>,
# hparams_search=<name>_optuna...): stored in Hydra's ConfigStore here for the same reason.
from kdx.configs import register as _register_config_options  # noqa: E402

_register_config_options()
