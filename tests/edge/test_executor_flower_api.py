"""The Flower 1.42 internals the device executor (edge.executor) is built on, checked by shape.

These are internal modules of Flower, not its public API. If an upgrade changes any of
them, this file fails with a message saying what moved, before a device silently stops
taking tasks. The behaviour is tested against the real SuperNode in
``test_executor.py``; this file only pins the names and signatures.
"""

from __future__ import annotations

import importlib.metadata
import inspect

import pytest

PINNED = "1.42.0"


def _params(fn: object) -> list[str]:
    return list(inspect.signature(fn).parameters)  # type: ignore[arg-type]


def test_flower_is_the_pinned_version() -> None:
    version = importlib.metadata.version("flwr")
    assert version == PINNED, (
        f"flwr {version} is installed; edge.executor was written against flwr {PINNED}. "
        "Re-read flwr.supernode.runtime.run_clientapp and flwr.supercore.* and update "
        "edge/executor.py and this file before changing the pin."
    )


def test_run_clientapp_task_functions_keep_their_signatures() -> None:
    from flwr.supernode.runtime import run_clientapp as rc

    expected = {
        "pull_task_input": ["client"],
        "push_message": ["client", "message", "context"],
        "push_task_output": ["client", "context", "sub_status", "details"],
    }
    for name, params in expected.items():
        fn = getattr(rc, name, None)
        assert fn is not None, f"flwr.supernode.runtime.run_clientapp.{name} is gone"
        assert _params(fn) == params, (
            f"run_clientapp.{name}{inspect.signature(fn)} changed; edge.executor calls it "
            f"with {params}"
        )


def test_the_runtime_http_client_has_the_calls_the_executor_makes() -> None:
    from flwr.supercore.runtime import RuntimeHttpClient

    for method in (
        "AcquireTask",
        "SendTaskHeartbeat",
        "PullTaskInput",
        "PullMessages",
        "PullObject",
        "ConfirmMessageReceived",
        "PushMessages",
        "PushObject",
        "PushTaskOutput",
        "close",
    ):
        assert callable(getattr(RuntimeHttpClient, method, None)), (
            f"flwr.supercore.runtime.RuntimeHttpClient.{method} is gone"
        )
    params = _params(RuntimeHttpClient.from_server_address)
    assert params[:4] == ["server_address", "insecure", "root_certificates", "interceptors"], (
        f"RuntimeHttpClient.from_server_address{inspect.signature(RuntimeHttpClient.from_server_address)} changed"
    )
    assert "retry_invoker" in params, (
        "from_server_address lost retry_invoker (the executor passes none)"
    )


def test_interceptors_and_protobufs_keep_their_shape() -> None:
    from flwr.proto.runtime_pb2 import (
        AcquireTaskRequest,
        AcquireTaskResponse,
        SendTaskHeartbeatRequest,
        SendTaskHeartbeatResponse,
    )
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )

    assert _params(RuntimeTokenHttpInterceptor.__init__) == ["self", "token"]
    assert _params(RuntimeVersionHttpInterceptor.__init__) == ["self", "component_name"]
    assert _params(SuperExecAuthHttpInterceptor.__init__) == [
        "self",
        "master_secret",
        "protected_methods",
    ], "SuperExecAuthHttpInterceptor changed: AcquireTask auth would break"
    for message, fields in (
        (AcquireTaskRequest, {"supported_task_types"}),
        (AcquireTaskResponse, {"task", "token"}),
        (SendTaskHeartbeatRequest, set()),
        (SendTaskHeartbeatResponse, {"success"}),
    ):
        names = {f.name for f in message.DESCRIPTOR.fields}
        assert fields <= names, f"{message.__name__} lost fields {fields - names}"


def test_constants_the_executor_relies_on() -> None:
    from flwr.common.constant import (
        HEARTBEAT_DEFAULT_INTERVAL,
        HEARTBEAT_PATIENCE,
        ErrorCode,
        SubStatus,
    )
    from flwr.supercore.constant import TaskType

    assert TaskType.CLIENT_APP.value == "flwr-clientapp"
    assert (SubStatus.COMPLETED, SubStatus.FAILED) == ("completed", "failed")
    assert (ErrorCode.CLIENT_APP_RAISED_EXCEPTION, ErrorCode.INVALID_FAB) == (2, 7)
    assert HEARTBEAT_DEFAULT_INTERVAL * HEARTBEAT_PATIENCE >= 30, (
        "the SuperNode now expires silent tasks sooner: check edge.executor.HEARTBEAT_EVERY_S"
    )


def test_the_supernode_cli_still_offers_process_isolation_and_executor_auth() -> None:
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    parser = _parse_args_run_supernode()
    args = parser.parse_args(
        [
            "--isolation",
            "process",
            "--superexec-auth-secret-file",
            "/dev/null",
            "--insecure",
        ]
    )
    assert args.isolation == "process"
    assert args.superexec_auth_secret_file == "/dev/null"
    with pytest.raises(SystemExit):
        parser.parse_args(["--isolation", "thread"])
