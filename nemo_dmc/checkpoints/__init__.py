"""Checkpoint and run-record resolution, below training, inference, convert and nemo:
what a checkpoint path holds (:mod:`.resolve`), a run's checkpoint directories and recorded
config (:mod:`.run_dir`, :mod:`.run_config`), weights checkpoints and atomic writes
(:mod:`.weights`, :mod:`.atomic`), a NeMo 2 context's recorded shape (:mod:`.nemo_context`),
and full state dicts across layer-spec layouts and tensor-parallel shards (:mod:`.layout`,
:mod:`.sharding`)."""
