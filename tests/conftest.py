"""Test-wide setup: 8 virtual CPU devices (for mesh tests), offline Hugging Face, shared tiny models."""

import os

# Must happen before jax is imported anywhere: the mesh tests need 8 host devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
