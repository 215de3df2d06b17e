"""The error tree and its translation from grpcio errors."""

from __future__ import annotations

import grpc
import pytest

import rpcframe
from rpcframe import errors


def _leaves() -> list[type[errors.RpcError]]:
    members = [getattr(errors, n) for n in errors.__all__]
    return [m for m in members if isinstance(m, type) and issubclass(m, errors.RpcError) and m is not errors.RpcError]


def test_one_leaf_per_non_ok_status() -> None:
    codes = [cls.status for cls in _leaves()]
    assert sorted(c.name for c in codes) == sorted(c.name for c in grpc.StatusCode if c is not grpc.StatusCode.OK)


def test_every_leaf_is_drawn_in_the_docstring() -> None:
    doc = errors.__doc__ or ""
    for cls in _leaves():
        assert cls.__name__ in doc
        assert cls.status.name in doc


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c is not grpc.StatusCode.OK])
def test_error_for_round_trips(code: grpc.StatusCode) -> None:
    err = errors.error_for(code, "why", (("k", "v"),))
    assert err.code() is code
    assert err.details() == "why"
    assert err.trailing_metadata() == (("k", "v"),)
    assert isinstance(err, grpc.RpcError)
    assert isinstance(err, rpcframe.RpcframeError)


class _FakeGrpcError(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.NOT_FOUND

    def details(self) -> str:
        return "no such order"

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-id", "1"),)


def test_from_grpc_translates_and_chains() -> None:
    original = _FakeGrpcError()
    err = errors.from_grpc(original)
    assert isinstance(err, rpcframe.NotFound)
    assert str(err) == "NOT_FOUND: no such order"
    assert err.trailing_metadata() == (("x-id", "1"),)
    assert err.__cause__ is original
    assert errors.from_grpc(err) is err


def test_from_grpc_without_call_interface_is_unknown() -> None:
    err = errors.from_grpc(grpc.RpcError())
    assert isinstance(err, rpcframe.Unknown)
    assert err.details() == ""


def test_config_error_is_a_value_error() -> None:
    assert issubclass(rpcframe.ConfigError, ValueError)
