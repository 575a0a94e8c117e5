"""Redis errors become domain errors at the storage edge: retryable ones as StoreUnavailable
(the only kind a fail_open_free product may decide without Redis), the rest as STORE_ERROR."""

from __future__ import annotations

import pytest
from redis import exceptions as redis_errors

from quota_sidecar.domain.errors import QuotaError, StoreUnavailable
from quota_sidecar.storage.transport import domain_error


@pytest.mark.parametrize("error", [
    redis_errors.ConnectionError("Connection refused"),
    redis_errors.TimeoutError("Timeout reading from socket"),
    redis_errors.ReadOnlyError("You can't write against a read only replica."),
    redis_errors.BusyLoadingError("Redis is loading the dataset in memory"),
    redis_errors.ResponseError("BUSY Redis is busy running a script."),
    # Redis 6.2 on a demoted master: the script's first write fails inside the script.
    redis_errors.ResponseError("Error running script (call to f_0a1b): @user_script:735: @user_script: 735: "
                               "-READONLY You can't write against a read only replica."),
])
def test_retryable_redis_errors_are_store_unavailable(error: redis_errors.RedisError) -> None:
    assert isinstance(domain_error(error), StoreUnavailable)


@pytest.mark.parametrize("error", [
    redis_errors.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
    redis_errors.ResponseError("Error running script (call to f_0a1b): @user_script:12: user_script:12: "
                               "attempt to compare nil with number"),
])
def test_other_redis_errors_are_store_errors(error: redis_errors.RedisError) -> None:
    converted = domain_error(error)
    assert type(converted) is QuotaError and converted.reason == "STORE_ERROR"
