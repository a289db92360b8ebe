"""tinker_jax.futures: a derived future follows its source, including cancellation semantics."""

from concurrent.futures import CancelledError, Future

import pytest

from tinker_jax.futures import then


def test_then_maps_results_and_errors():
    src = Future()
    out = then(src, lambda x: x + 1)
    src.set_result(1)
    assert out.result() == 2
    src = Future()
    out = then(src, lambda x: x)
    src.set_exception(ValueError("boom"))
    with pytest.raises(ValueError, match="boom"):
        out.result()


def test_then_cancels_only_what_has_not_started():
    src = Future()
    out = then(src, lambda x: x)
    assert out.cancel() and src.cancelled() and out.cancelled()
    with pytest.raises(CancelledError):
        out.result()
    # Once the work started, a cancel is refused (the client is not told "cancelled" while it happens).
    src = Future()
    out = then(src, lambda x: x)
    assert src.set_running_or_notify_cancel()
    assert not out.cancel() and not out.cancelled()
    src.set_result("done")
    assert out.result() == "done"
