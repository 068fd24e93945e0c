"""megatron-core integration: the KV-method attention modules, the layer-spec transform, model
building, statistics and loss across tensor-parallel ranks, the stage schedule, and the CPU
shims."""
