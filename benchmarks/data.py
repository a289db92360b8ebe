"""The same data for ours and the peers: deterministic random token ids (avoiding the special ids at the top of
the vocabulary), as numpy arrays for torch and as `tinker.types` datums for the Tinker APIs."""

from __future__ import annotations

import numpy as np

N_SPECIAL = 3  # <|endoftext|>, <|im_start|>, <|im_end|> sit at V-3..V-1


def token_batch(seed: int, rows: int, length: int, vocab_size: int) -> np.ndarray:
    """[rows, length + 1] int64 ids: inputs are [:, :-1], next-token targets [:, 1:]."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab_size - N_SPECIAL, size=(rows, length + 1), dtype=np.int64)


def prompts(seed: int, rows: int, length: int, vocab_size: int) -> np.ndarray:
    return token_batch(seed, rows, length - 1, vocab_size)


def datums(tokens: np.ndarray):
    """Cross-entropy datums (weights all 1) for each row of `token_batch`."""
    import tinker.types as tt

    out = []
    for row in tokens:
        out.append(tt.Datum(
            model_input=tt.ModelInput.from_ints([int(t) for t in row[:-1]]),
            loss_fn_inputs={"target_tokens": tt.TensorData.from_numpy(np.ascontiguousarray(row[1:])),
                            "weights": tt.TensorData.from_numpy(np.ones(len(row) - 1, np.float32))}))
    return out


def model_input(ids) -> object:
    import tinker.types as tt

    return tt.ModelInput.from_ints([int(t) for t in ids])
