"""A per-test wall-clock limit without pytest-timeout: SIGALRM raises inside the test (``re`` and torch ops
check for signals), so a regression that hangs fails its test instead of stalling CI."""
import signal

import pytest

LIMIT_S = 120


@pytest.fixture(autouse=True)
def time_limit(request):
    limit = getattr(request.module, "TIME_LIMIT_S", LIMIT_S)

    def expire(signum, frame):
        raise TimeoutError(f"{request.node.name} ran past its {limit} s limit (a hang?)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(limit)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
