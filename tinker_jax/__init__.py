"""tinker_jax: the Tinker post-training API on JAX, in-process (ServiceClient) or over REST (server/)."""

__version__ = "0.1.0"
__all__ = ["ServiceClient", "TrainingClient", "SamplingClient", "RestClient", "APIFuture", "__version__"]


def __getattr__(name):
    # Lazy: importing the client pulls in JAX and the SDK's types (seconds); the CLI's light commands
    # (e.g. init-model's argument checks) should not pay for that.
    if name == "RestClient":
        from tinker_jax.rest_client import RestClient

        return RestClient
    if name in __all__:
        from tinker_jax import client

        return getattr(client, name)
    raise AttributeError(f"module 'tinker_jax' has no attribute {name!r}")
