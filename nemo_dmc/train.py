"""``python -m nemo_dmc.train``: DMC retrofitting with Hydra configs from ``conf/``.

Examples::

    python -m nemo_dmc.train                                   # tiny model, all three stages
    python -m nemo_dmc.train stage=retrofit stage.retrofit.steps=200 dmc.target_cr=2
    torchrun --nproc-per-node 2 -m nemo_dmc.train parallel=tp2
"""

from __future__ import annotations

import sys
from pathlib import Path

from nemo_dmc.quiet import quiet_third_party  # noqa: E402

quiet_third_party()  # before megatron / torch print their notices

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from nemo_dmc.config_help import register_help  # noqa: E402
from nemo_dmc.training.config import ConfigError, TrainConfig, register_schema  # noqa: E402

register_schema()
register_help("train", TrainConfig)
CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf"
"""The Hydra config tree (``conf/`` of the source checkout or editable install)."""


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """The typed :class:`TrainConfig` of a composed Hydra config."""
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from nemo_dmc.training.runner import run

    try:
        run(to_train_config(cfg))
    except ConfigError as err:
        sys.exit(f"config error: {err}")


if __name__ == "__main__":
    main()
