"""megatron-core integration: DMC attention modules, the layer-spec transform, model
building, statistics across tensor-parallel ranks, and the CPU shims."""
