"""tinker_jax: the Tinker post-training API on JAX, in-process (ServiceClient) or over REST (server/)."""

__version__ = "0.1.0"

from tinker_jax.client import APIFuture, SamplingClient, ServiceClient, TrainingClient  # noqa: E402

__all__ = ["ServiceClient", "TrainingClient", "SamplingClient", "APIFuture", "__version__"]
