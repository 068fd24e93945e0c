"""``python -m nemo_dmc.evaluate``: evaluate a checkpoint (Hydra, ``conf/evaluate.yaml``).

Held-out perplexity at the realised CR, realised CR overall / per layer / per KV head (with a
heatmap PNG), KV bytes against the uncompressed cache, and passkey retrieval, under DMC or a
baseline cache policy. Writes ``results.json`` to ``output_dir`` and prints a summary.

Examples::

    python -m nemo_dmc.evaluate load=runs/dmc_tiny
    python -m nemo_dmc.evaluate load=runs/dmc_tiny method=vanilla
    python -m nemo_dmc.evaluate load=runs/dmc_tiny method=h2o ratio=4 data.num_sequences=64
    python -m nemo_dmc.evaluate load=runs/dmc_tiny passkey.lengths='[64,128,256]' output_dir=eval/x
"""

from __future__ import annotations

import sys

from nemo_dmc.quiet import quiet_third_party  # noqa: E402

quiet_third_party()  # before megatron / torch print their notices

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from nemo_dmc.config_help import register_help  # noqa: E402
from nemo_dmc.evaluate.config import EvaluateConfig, register_schema  # noqa: E402

register_schema()
register_help("evaluate", EvaluateConfig)


@hydra.main(config_path="../../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    config: EvaluateConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    try:
        config.validate()  # before megatron is imported: a bad key fails in a second
    except ValueError as err:
        sys.exit(f"error: {err}")
    from nemo_dmc.data.datasets import CorruptDatasetError
    from nemo_dmc.evaluate.runner import run

    try:
        run(config)
    except (ValueError, FileNotFoundError, ImportError, CorruptDatasetError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
