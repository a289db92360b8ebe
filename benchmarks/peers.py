"""Peers that this harness records but does not run, with the reason (never a number it did not measure)."""

from __future__ import annotations

from importlib import metadata

SKYRL = "skyrl-tx"


def skyrl_tx_status() -> str:
    """skyrl-tx 0.3.0 (PyPI) was checked with `pip download --no-deps skyrl-tx==0.3.0` and its Requires-Dist:
    `transformers<5,>=4.56.1`, `datasets`, `hf_transfer`, `peft`, ... and, for its JAX backend (extra `jax`),
    `jax[cuda12]>=0.7.2` + `flax>=0.12.2`. Installing it would downgrade this project's transformers and pull a CUDA
    jax into a CPU venv, so it is not installed here; and if it were present, this harness does not drive its
    backend, so it would still not produce a figure."""
    try:
        v = metadata.version(SKYRL)
    except metadata.PackageNotFoundError:
        try:
            ours = metadata.version("transformers")
        except metadata.PackageNotFoundError:
            ours = "none"
        return (f"not installed: skyrl-tx 0.3.0 requires transformers<5 (this environment has {ours}) and its "
                "jax extra pulls jax[cuda12], datasets and hf_transfer; installing it would change the project's "
                "environment")
    return f"not run: skyrl-tx {v} is installed but this harness does not drive its backend"
