"""Training: batching of datums, the loss registry, the jitted step and the optimizer."""
