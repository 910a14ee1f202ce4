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
        "edge/executor.py, edge/runtime_api.py and this file before changing the pin."
    )


def test_the_runtime_api_paths_and_messages_are_flowers() -> None:
    """edge.runtime_api calls the same paths with the same messages as Flower's own client."""
    from flwr.supercore.runtime import RuntimeHttpClient

    from edge import runtime_api

    calls = {
        "AcquireTask": "acquire-task",
        "SendTaskHeartbeat": "send-task-heartbeat",
        "PullTaskInput": "pull-task-input",
        "PullMessages": "pull-messages",
        "PullObject": "pull-object",
        "ConfirmMessageReceived": "confirm-message-received",
        "PushMessages": "push-messages",
        "PushObject": "push-object",
        "PushTaskOutput": "push-task-output",
    }
    for method, path in calls.items():
        theirs = getattr(RuntimeHttpClient, method, None)
        assert theirs is not None, f"flwr's RuntimeHttpClient.{method} is gone"
        source = inspect.getsource(theirs)
        assert f'path="{runtime_api.PATH_PREFIX}{path}"' in source, (
            f"Flower's {method} no longer posts to {runtime_api.PATH_PREFIX}{path}:\n{source}"
        )
        assert f'"/flwr.proto.Runtime/{method}"' in source
        ours = inspect.getsource(getattr(runtime_api.RuntimeApiClient, method))
        assert f'"{path}"' in ours, f"edge.runtime_api's {method} posts elsewhere"
        hints = inspect.get_annotations(theirs, eval_str=True)
        our_hints = inspect.get_annotations(
            getattr(runtime_api.RuntimeApiClient, method), eval_str=True
        )
        assert (hints["request"], hints["return"]) == (our_hints["request"], our_hints["return"]), (
            f"{method}: Flower now sends {hints['request']} and gets {hints['return']}"
        )


def test_the_wire_format_and_headers_are_flowers() -> None:
    from flwr.supercore.constant import (
        FLWR_COMPONENT_NAME_METADATA_KEY,
        FLWR_PACKAGE_NAME_METADATA_KEY,
        FLWR_PACKAGE_VERSION_METADATA_KEY,
        TASK_TOKEN_HEADER,
    )
    from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor
    from flwr.supercore.protobuf.constants import PROTOBUF_MEDIA_TYPE
    from flwr.supercore.runtime_version_compatibility import RuntimeVersionMetadata

    from edge import runtime_api

    assert runtime_api.PROTOBUF_MEDIA_TYPE == PROTOBUF_MEDIA_TYPE
    assert TASK_TOKEN_HEADER == "flwr-task-token"
    version = dict(RuntimeVersionMetadata.from_local_component("x").as_metadata())
    assert set(version) == {
        FLWR_PACKAGE_NAME_METADATA_KEY,
        FLWR_PACKAGE_VERSION_METADATA_KEY,
        FLWR_COMPONENT_NAME_METADATA_KEY,
    }, f"Flower's runtime version headers changed: {sorted(version)}"
    # Flower signs AcquireTask with these helpers, as edge.runtime_api does.
    source = inspect.getsource(SuperExecAuthHttpInterceptor)
    assert "derive_auth_secret(master_secret)" in source
    assert "create_superexec_auth_metadata(" in source


def test_the_task_helpers_do_what_run_clientapp_does() -> None:
    """Our pull/push follow run_clientapp's: the same Flower helpers in the same roles."""
    from flwr.supernode.runtime import run_clientapp as rc

    for name, helpers in {
        "pull_task_input": (
            "pull_and_inflate_object_from_tree",
            "make_pull_object_fn_protobuf",
            "make_confirm_message_received_fn_protobuf",
            "context_from_proto",
            '__dict__["_message_id"] = object_tree.object_id',
        ),
        "push_message": (
            "remove_content_from_message",
            "no_object_id_recompute",
            "get_object_tree",
            "get_all_nested_objects",
            "make_push_object_fn_protobuf",
            "session_id=push_msg_res.session_id",
            "object_ids_to_push",
        ),
        "push_task_output": ("context_to_proto", "sub_status=sub_status", "details=details"),
    }.items():
        source = inspect.getsource(getattr(rc, name))
        for helper in helpers:
            assert helper in source, (
                f"flwr's run_clientapp.{name} no longer uses {helper}: re-read it and "
                "update edge/runtime_api.py"
            )


def test_the_device_process_does_not_import_flowers_web_and_cli_stack() -> None:
    """The executor's imports stay light: FastAPI & co. cost a 512 MB device ~21 MB."""
    import subprocess
    import sys

    code = (
        "import sys, edge.cli, edge.commands, edge.executor, edge.supervisor, edge.clientapp;"
        "heavy = [m for m in ('fastapi', 'starlette', 'pydantic', 'requests', 'yaml',"
        " 'flwr.cli', 'flwr.supernode.runtime.run_clientapp') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "", f"a device process now imports {out.stdout.strip()}"


def test_interceptors_and_protobufs_keep_their_shape() -> None:
    from flwr.proto.runtime_pb2 import (
        AcquireTaskRequest,
        AcquireTaskResponse,
        SendTaskHeartbeatRequest,
        SendTaskHeartbeatResponse,
    )

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
