"""Training pipeline over megatron-core: structured configs, stage plans, the loop,
optimizer and schedule, dist_checkpointing checkpoints, logging, and launch environments.

Entry point: ``python -m nemo_dmc.train`` (Hydra, configs in ``conf/``), or
:func:`nemo_dmc.training.runner.run` with a :class:`~nemo_dmc.training.config.TrainConfig`.
"""
