"""Test-wide setup: 8 virtual CPU devices (for mesh tests), offline Hugging Face, shared tiny models."""

import os

# Must happen before jax is imported anywhere: the mesh tests need 8 host devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import atexit  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402


# The end of the test process. CI's run of 2026-12-06 (stop 20) passed every test and then died with SIGABRT while
# the interpreter was tearing down: faulthandler showed the main thread with no Python frame left and the abort in a
# thread that has no Python state (a native thread: XLA's, torch's, or a C extension's), after every atexit
# function had run. Whatever native thread that is, nothing of the suite's result depends on the teardown, so with
# TINKER_JAX_TEST_FAST_EXIT=1 (set by `make test`, which CI runs) the process ends here: atexit functions run as usual
# (temporary models are removed, engines nobody shut down stop their workers), streams are flushed, and the exit
# status is the session's. Without it (a plain `pytest`, or pytest run inside another program) nothing changes.
@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    session.config._final_exitstatus = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    status = getattr(config, "_final_exitstatus", None)
    if status is None or os.environ.get("TINKER_JAX_TEST_FAST_EXIT") != "1":
        return
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
