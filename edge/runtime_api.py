"""A small client for the SuperNode's runtime API, as the device's executor uses it.

``flower-supernode --isolation process`` serves its runtime API as protobuf over HTTP:
every call is a ``POST /v1/runtime/<call>`` whose body is the serialized request message
(``application/protobuf``) and whose answer is the serialized response. Each request
names the caller's Flower version and component in three ``flwr-*`` headers; a task's
calls carry its token in ``flwr-task-token``; ``AcquireTask`` is signed with the SuperExec
auth secret the SuperNode was started with (Flower's own HMAC helpers do the signing).

Flower ships a client for this (``flwr.supercore.runtime.RuntimeHttpClient`` with the
interceptors of ``flwr.supercore.interceptors``, and ``flwr.supernode.runtime.
run_clientapp`` for the task's input and output). Importing those pulls in Flower's CLI,
FastAPI, Starlette, pydantic, requests and PyYAML, about 21 MB of RSS that a 512 MB device
pays for nothing: the executor needs nine HTTP calls. This module makes those calls
itself and reuses only Flower's light pieces (its protobuf messages, serde, the object
tree inflate/deflate helpers and the HMAC signing), which the ClientApp imports anyway.

Everything here follows ``flwr==1.42.0``; ``tests/edge/test_executor_flower_api.py`` pins
the names and paths and ``tests/edge/test_executor.py`` runs it against a real SuperNode,
so an upgrade that changes the protocol fails loudly there.
"""

from __future__ import annotations

import logging
from typing import TypeVar

import httpx
from flwr.app import Context, Message
from flwr.app.message import remove_content_from_message
from flwr.common.serde import context_from_proto, context_to_proto, message_to_proto
from flwr.proto.message_pb2 import (
    ConfirmMessageReceivedRequest,
    ConfirmMessageReceivedResponse,
    PullObjectRequest,
    PullObjectResponse,
    PushObjectRequest,
    PushObjectResponse,
)
from flwr.proto.node_pb2 import Node
from flwr.proto.runtime_pb2 import (
    AcquireTaskRequest,
    AcquireTaskResponse,
    PullAppMessagesRequest,
    PullAppMessagesResponse,
    PullTaskInputRequest,
    PullTaskInputResponse,
    PushAppMessagesRequest,
    PushAppMessagesResponse,
    PushTaskOutputRequest,
    PushTaskOutputResponse,
    SendTaskHeartbeatRequest,
    SendTaskHeartbeatResponse,
)
from flwr.supercore.auth.superexec import create_superexec_auth_metadata, derive_auth_secret
from flwr.supercore.constant import (
    FLWR_COMPONENT_NAME_METADATA_KEY,
    FLWR_PACKAGE_NAME_METADATA_KEY,
    FLWR_PACKAGE_VERSION_METADATA_KEY,
    TASK_TOKEN_HEADER,
    VERSION_INCOMPATIBILITY_MESSAGE_METADATA_KEY,
)
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    get_object_tree,
    no_object_id_recompute,
)
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
    make_push_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import (
    pull_and_inflate_object_from_tree,
    push_objects,
)
from flwr.supercore.version import package_name as flwr_package_name
from flwr.supercore.version import package_version as flwr_package_version
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage

logger = logging.getLogger(__name__)

#: Where the runtime API's calls live (Flower 1.42's ``RuntimeHttpClient``).
PATH_PREFIX = "/v1/runtime/"
#: The body's media type, both ways.
PROTOBUF_MEDIA_TYPE = "application/protobuf"
#: The gRPC-style method name the SuperExec signature covers.
ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"
#: How much of an error response ends up in the exception (the SuperNode's JSON error).
ERROR_BODY_CHARS = 500

R = TypeVar("R", bound=ProtoMessage)


class RuntimeApiClient:
    """One connection to a SuperNode's runtime API, as ``component`` (and maybe a task).

    Calls raise ``httpx.TransportError`` when the SuperNode cannot be reached,
    ``httpx.HTTPStatusError`` (with the SuperNode's error text) when it refuses a call,
    and ``ValueError`` for an answer that is not the expected protobuf message.
    """

    def __init__(
        self,
        address: str,
        component: str,
        *,
        token: str | None = None,
        auth_secret: bytes | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        self.address = address
        self._headers = {
            "content-type": PROTOBUF_MEDIA_TYPE,
            "accept": PROTOBUF_MEDIA_TYPE,
            FLWR_PACKAGE_NAME_METADATA_KEY: flwr_package_name,
            FLWR_PACKAGE_VERSION_METADATA_KEY: flwr_package_version,
            FLWR_COMPONENT_NAME_METADATA_KEY: component,
        }
        if token:
            self._headers[TASK_TOKEN_HEADER] = token
        self._auth_secret = derive_auth_secret(auth_secret) if auth_secret else None
        self._http = httpx.Client(base_url=f"http://{address}", timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def _call(self, call: str, method: str, request: ProtoMessage, response_type: type[R]) -> R:
        headers = dict(self._headers)
        if method == ACQUIRE_METHOD and self._auth_secret is not None:
            headers.update(
                create_superexec_auth_metadata(
                    auth_secret=self._auth_secret, method=method, request=request
                )
            )
        response = self._http.post(
            PATH_PREFIX + call,
            content=request.SerializeToString(deterministic=True),
            headers=headers,
        )
        if warning := response.headers.get(VERSION_INCOMPATIBILITY_MESSAGE_METADATA_KEY):
            logger.warning("SuperNode runtime API: %s", warning)
        if response.is_error:
            raise httpx.HTTPStatusError(
                f"{method} answered {response.status_code}: "
                f"{response.text[:ERROR_BODY_CHARS].strip() or response.reason_phrase}",
                request=response.request,
                response=response,
            )
        result = response_type()
        try:
            result.ParseFromString(response.content)
        except DecodeError as exc:
            raise ValueError(f"{method} answered with a body that is not protobuf") from exc
        return result

    # The calls, named as in Flower's runtime.proto so that Flower's object helpers
    # (``make_pull_object_fn_protobuf`` etc.) can take them as they are.

    def AcquireTask(self, request: AcquireTaskRequest) -> AcquireTaskResponse:
        return self._call("acquire-task", ACQUIRE_METHOD, request, AcquireTaskResponse)

    def SendTaskHeartbeat(self, request: SendTaskHeartbeatRequest) -> SendTaskHeartbeatResponse:
        return self._call(
            "send-task-heartbeat",
            "/flwr.proto.Runtime/SendTaskHeartbeat",
            request,
            SendTaskHeartbeatResponse,
        )

    def PullTaskInput(self, request: PullTaskInputRequest) -> PullTaskInputResponse:
        return self._call(
            "pull-task-input", "/flwr.proto.Runtime/PullTaskInput", request, PullTaskInputResponse
        )

    def PullMessages(self, request: PullAppMessagesRequest) -> PullAppMessagesResponse:
        return self._call(
            "pull-messages", "/flwr.proto.Runtime/PullMessages", request, PullAppMessagesResponse
        )

    def PullObject(self, request: PullObjectRequest) -> PullObjectResponse:
        return self._call(
            "pull-object", "/flwr.proto.Runtime/PullObject", request, PullObjectResponse
        )

    def ConfirmMessageReceived(
        self, request: ConfirmMessageReceivedRequest
    ) -> ConfirmMessageReceivedResponse:
        return self._call(
            "confirm-message-received",
            "/flwr.proto.Runtime/ConfirmMessageReceived",
            request,
            ConfirmMessageReceivedResponse,
        )

    def PushMessages(self, request: PushAppMessagesRequest) -> PushAppMessagesResponse:
        return self._call(
            "push-messages", "/flwr.proto.Runtime/PushMessages", request, PushAppMessagesResponse
        )

    def PushObject(self, request: PushObjectRequest) -> PushObjectResponse:
        return self._call(
            "push-object", "/flwr.proto.Runtime/PushObject", request, PushObjectResponse
        )

    def PushTaskOutput(self, request: PushTaskOutputRequest) -> PushTaskOutputResponse:
        return self._call(
            "push-task-output",
            "/flwr.proto.Runtime/PushTaskOutput",
            request,
            PushTaskOutputResponse,
        )


def pull_task_input(client: RuntimeApiClient) -> tuple[Message, Context]:
    """The task's message and context (its run and FAB are not needed, so not decoded)."""
    res = client.PullTaskInput(PullTaskInputRequest())
    context = context_from_proto(res.context)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list or not pulled.message_object_trees:
        raise ValueError("the SuperNode gave the task no message")
    tree = pulled.message_object_trees[0]
    node = Node(node_id=context.node_id)
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(
            client.ConfirmMessageReceived, node, context.run_id
        ),
        return_type=Message,
    )
    # A deflated message does not carry its own id (the id is its object id).
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message, context


def push_message(client: RuntimeApiClient, message: Message, context: Context) -> None:
    """Send the task's reply: its metadata first, then the objects the SuperNode lacks."""
    message.metadata.__dict__["_message_id"] = message.object_id
    header = message_to_proto(remove_content_from_message(message))
    with no_object_id_recompute():
        tree = get_object_tree(message)
        res = client.PushMessages(
            PushAppMessagesRequest(messages_list=[header], message_object_trees=[tree])
        )
        push_objects(
            get_all_nested_objects(message),
            make_push_object_fn_protobuf(
                client.PushObject,
                Node(node_id=context.node_id),
                run_id=context.run_id,
                session_id=res.session_id,
            ),
            object_ids_to_push=set(res.objects_to_push),
        )


def push_task_output(
    client: RuntimeApiClient, context: Context | None, sub_status: str, details: str
) -> None:
    """End the task: its (possibly updated) context and how it ended."""
    client.PushTaskOutput(
        PushTaskOutputRequest(
            context=context_to_proto(context) if context is not None else None,
            sub_status=sub_status,
            details=details,
        )
    )
