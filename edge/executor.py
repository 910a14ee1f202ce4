"""The device's Flower executor: SuperNode tasks run in a thread of the warm edgefl process.

``flower-supernode --isolation process`` starts no SuperExec: it queues one *task* per
message it receives and waits for an executor on its runtime API (its ``--port``).
:class:`TaskExecutor` is that executor, inside ``edgefl edge up``. For each task it
does what Flower's ``flwr-clientapp`` process does (``flwr.supernode.runtime.
run_clientapp``), minus the process and minus the FAB, over the runtime API client of
:mod:`edge.runtime_api` (Flower's own client imports 21 MB of web and CLI packages):

1. ``AcquireTask`` (signed with the SuperExec auth secret the SuperNode was started
   with, so no other local process can take the device's tasks) → a task token;
2. ``pull_task_input`` → message and context (the FAB is never unpacked, put on
   ``sys.path`` or imported), bounded by ``input_timeout_s``:
   Flower's own pull retries a missing object for up to two hours, and a SuperNode that
   reconnected to a restarted SuperLink can hand out a task whose message it then ignores
   (its run is no longer running). Unbounded, that one task would keep the device busy,
   so it would miss every round of the new run;
3. **approval**: the message must carry the fleet's signed approval of the task's run
   (:mod:`edge.run_approval`), otherwise it is refused and nothing of it runs;
4. the installed :class:`~edge.clientapp.EdgeClientApp` answers it in a worker thread,
   calling the device's Trainer directly, bounded by ``task_timeout_s``;
5. ``push_message`` (the reply, or an error reply with the reason) and
   ``push_task_output``, while a heartbeat thread keeps the task alive.

One task runs at a time. A task that raises, is refused, times out or is cancelled
(its run stopped: the heartbeat is refused; or the device shuts down) is answered
with an error message naming the reason; the Trainer stops between two steps and
owns its interpreter, so the served model, the model store and the local samples
are untouched and the next task trains as usual.

Flower internals used here and in :mod:`edge.runtime_api` are pinned by
``flwr==1.42.0`` and checked by ``tests/edge/test_executor_flower_api.py``, which fails
loudly when an upgrade changes them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.common.constant import (
    HEARTBEAT_DEFAULT_INTERVAL,
    HEARTBEAT_PATIENCE,
    ErrorCode,
    SubStatus,
)
from flwr.proto.runtime_pb2 import AcquireTaskRequest, SendTaskHeartbeatRequest
from flwr.supercore.constant import TaskType

from edge.errors import EdgeError, TaskInputUnavailable, TaskRefused, TrainingCancelled
from edge.run_approval import APPROVAL_KEY, ApprovalError, verify_approval
from edge.runtime_api import (
    RuntimeApiClient,
    pull_task_input,
    push_message,
    push_task_output,
)

logger = logging.getLogger(__name__)

#: Seconds between two ``AcquireTask`` calls while idle (loopback, cheap).
POLL_INTERVAL_S = 0.1
#: Seconds a task may run before it is cancelled and answered with an error.
TASK_TIMEOUT_S = 600.0
#: Seconds the task's input (message, context) may take to arrive from the SuperNode.
#: Its objects are already in the SuperNode's store, on loopback: this is generous.
INPUT_TIMEOUT_S = 30.0
#: Seconds a cancelled task gets to stop before the error reply goes out anyway.
CANCEL_GRACE_S = 10.0
#: Seconds between task heartbeats (the SuperNode fails a task after
#: ``HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL`` s without one).
HEARTBEAT_EVERY_S = HEARTBEAT_DEFAULT_INTERVAL / 3

#: Error codes of the replies (Flower's own ``ErrorCode`` values).
REFUSED_CODE = ErrorCode.INVALID_FAB
"""An unapproved run: like Flower's own refusal of an unverified FAB."""
FAILED_CODE = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
"""The ClientApp refused the content or the Trainer raised, timed out or was cancelled."""

Handler = Callable[..., Message]
"""``handler(message, context, cancelled=callable) -> reply`` (an EdgeClientApp)."""


@dataclass(frozen=True)
class Trust:
    """What a run needs to be executed: an approval for ``fleet`` by ``public_key``."""

    fleet: str
    public_key: Ed25519PublicKey


@dataclass
class TaskOutcome:
    """What happened to one task (kept for status and tests)."""

    task_id: int
    run_id: int
    message_type: str
    status: str
    """``completed``, ``refused``, ``failed``, ``timed-out`` or ``cancelled``."""
    reason: str
    seconds: float


def error_reason(exc: BaseException) -> str:
    """A short reason for an error reply: domain errors by message, the rest by type too."""
    if isinstance(exc, EdgeError):
        return f"{type(exc).__name__}: {exc}"
    return f"{type(exc).__name__}: {exc} (unexpected error on the device)"


class _Heartbeat:
    """Keeps one task alive; a refused heartbeat (run stopped, task expired) cancels it."""

    def __init__(self, client: RuntimeApiClient, cancel: threading.Event) -> None:
        self._client = client
        self._cancel = cancel
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgefl-task-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_EVERY_S):
            try:
                ok = self._client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success
            except (httpx.HTTPError, ValueError) as exc:
                logger.warning("task heartbeat failed: %s", exc)
                continue
            if not ok:
                logger.warning("the SuperNode refused the task heartbeat: cancelling the task")
                self._cancel.set()
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class TaskExecutor:
    """Acquires the SuperNode's tasks and answers them with ``handler``, one at a time."""

    def __init__(
        self,
        runtime_address: str,
        handler: Handler,
        trust: Trust,
        *,
        auth_secret: bytes | None = None,
        poll_interval_s: float = POLL_INTERVAL_S,
        task_timeout_s: float = TASK_TIMEOUT_S,
        input_timeout_s: float = INPUT_TIMEOUT_S,
    ) -> None:
        self.runtime_address = runtime_address
        self.handler = handler
        self.trust = trust
        self.auth_secret = auth_secret
        self.poll_interval_s = poll_interval_s
        self.task_timeout_s = task_timeout_s
        self.input_timeout_s = input_timeout_s
        self.outcomes: list[TaskOutcome] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._worker = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="edgefl-task"
        )
        self._busy = threading.Event()
        self._cancel = threading.Event()

    @property
    def busy(self) -> bool:
        """Whether a task is being executed."""
        return self._busy.is_set()

    def start(self) -> TaskExecutor:
        self._thread = threading.Thread(target=self._loop, name="edgefl-executor", daemon=True)
        self._thread.start()
        logger.info("executor polling the SuperNode runtime API at %s", self.runtime_address)
        return self

    def stop(self, timeout: float = CANCEL_GRACE_S + 5) -> None:
        """Stop acquiring, cancel a running task (it is answered with an error), join."""
        self._stop.set()
        self._cancel.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
        self._worker.shutdown(wait=False, cancel_futures=True)

    def abandon_task(self, why: str) -> bool:
        """Cancel the running task, if any, because its SuperNode is gone (``why``).

        Its reply could never be delivered (a restarted SuperNode does not know the old
        task), and a device that keeps training for it cannot answer the new
        SuperNode's first messages in time. Returns whether a task was running.
        """
        if not self._busy.is_set():
            return False
        logger.warning("abandoning the running task: %s", why)
        self._cancel.set()
        return True

    # -- the loop -------------------------------------------------------------------------

    def _acquire_client(self) -> RuntimeApiClient:
        # ``AcquireTask`` is signed with the auth secret; no retries in the client: the
        # loop below decides when to try again.
        return RuntimeApiClient(
            self.runtime_address, "SuperExec", auth_secret=self.auth_secret or None
        )

    def _loop(self) -> None:
        client = self._acquire_client()
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
        unreachable_since: float | None = None
        try:
            while not self._stop.is_set():
                try:
                    res = client.AcquireTask(request)
                except (httpx.TransportError, httpx.HTTPStatusError) as exc:
                    # SuperNode starting or restarting: the supervisor watches it.
                    now = time.monotonic()
                    if unreachable_since is None:
                        unreachable_since = now
                        logger.info("SuperNode runtime API not reachable yet: %s", exc)
                    self._stop.wait(min(1.0, 0.1 + (now - unreachable_since) / 10))
                    continue
                if unreachable_since is not None:
                    logger.info("SuperNode runtime API reachable at %s", self.runtime_address)
                    unreachable_since = None
                if not (res.HasField("task") and res.token):
                    self._stop.wait(self.poll_interval_s)
                    continue
                try:
                    self._run_task(res.task.task_id, res.task.run_id, res.token)
                except Exception:  # a bug must not stop the device's executor
                    logger.exception("task %d failed inside the executor", res.task.task_id)
                    self._busy.clear()
        finally:
            client.close()

    # -- one task -------------------------------------------------------------------------

    def _run_task(self, task_id: int, run_id: int, token: str) -> None:
        started = time.monotonic()
        self._busy.set()
        self._cancel.clear()
        client = self._task_client(token)
        heartbeat = _Heartbeat(client, self._cancel)
        heartbeat.start()
        message: Message | None = None
        context: Context | None = None
        reply: Message | None = None
        status, reason, sub_status = "failed", "task input could not be pulled", SubStatus.FAILED
        try:
            message, context = self._pull_input(token)
            if message.metadata.run_id != run_id or context.run_id != run_id:
                raise TaskRefused(
                    f"task {task_id} of run {run_id} came with a message of run "
                    f"{message.metadata.run_id}"
                )
            status, reason, reply = self._execute(message, context, run_id)
            sub_status = SubStatus.COMPLETED if status == "completed" else SubStatus.FAILED
        except Exception as exc:
            reason = error_reason(exc)
            logger.error("task %d of run %d: %s", task_id, run_id, reason)
            if message is not None:
                reply = Message(Error(code=FAILED_CODE, reason=reason), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception as exc:  # the SuperNode expires the task and replies itself
                logger.error("task %d: reply not delivered to the SuperNode: %s", task_id, exc)
            try:
                push_task_output(
                    client, context, sub_status, "" if status == "completed" else reason
                )
            except Exception as exc:
                logger.error("task %d: output not delivered to the SuperNode: %s", task_id, exc)
            heartbeat.stop()
            client.close()
            self._busy.clear()
        outcome = TaskOutcome(
            task_id=task_id,
            run_id=run_id,
            message_type="" if message is None else message.metadata.message_type,
            status=status,
            reason=reason,
            seconds=time.monotonic() - started,
        )
        self.outcomes.append(outcome)
        del self.outcomes[:-100]
        logger.log(
            logging.INFO if status == "completed" else logging.WARNING,
            "task %d (run %d, %s): %s in %.2fs%s",
            task_id,
            run_id,
            outcome.message_type or "?",
            status,
            outcome.seconds,
            f": {reason}" if reason else "",
        )

    def _task_client(self, token: str) -> RuntimeApiClient:
        return RuntimeApiClient(self.runtime_address, "flwr-clientapp", token=token)

    def _pull_input(self, token: str) -> tuple[Message, Context]:
        """The task's message and context, or :class:`TaskInputUnavailable` in time.

        The pull runs on its own client in a helper thread; giving up closes that client,
        which ends the pull's retries (its next request fails at once).
        """
        client = self._task_client(token)
        pulled: concurrent.futures.Future[tuple[Message, Context]] = concurrent.futures.Future()

        def pull() -> None:
            try:
                # The FAB is never pulled apart, put on sys.path or imported.
                pulled.set_result(pull_task_input(client))
            except BaseException as exc:
                pulled.set_exception(exc)

        threading.Thread(target=pull, name="edgefl-task-input", daemon=True).start()
        deadline = time.monotonic() + self.input_timeout_s
        try:
            while True:
                with contextlib.suppress(concurrent.futures.TimeoutError):
                    return pulled.result(timeout=0.2)
                if self._cancel.is_set():
                    raise TrainingCancelled("the task was cancelled before its input arrived")
                if time.monotonic() >= deadline:
                    raise TaskInputUnavailable(
                        f"the task's message did not arrive from the SuperNode within "
                        f"{self.input_timeout_s:.0f}s (its run may have ended)"
                    )
        finally:
            client.close()

    def _execute(self, message: Message, context: Context, run_id: int) -> tuple[str, str, Message]:
        """(status, reason, reply) for one message; the approval is checked first."""
        try:
            record = message.content.get(APPROVAL_KEY, None)
            verify_approval(self.trust.public_key, record, self.trust.fleet, run_id)  # type: ignore[arg-type]
        except (ApprovalError, TypeError) as exc:
            reason = f"run {run_id} refused by the device: {exc}"
            logger.warning("%s", reason)
            return (
                "refused",
                reason,
                Message(Error(code=REFUSED_CODE, reason=reason), reply_to=message),
            )

        cancel = self._cancel
        future = self._worker.submit(self.handler, message, context, cancelled=cancel.is_set)
        try:
            reply = future.result(timeout=self.task_timeout_s)
            return "completed", "", reply
        except concurrent.futures.TimeoutError:
            cancel.set()
            status = "timed-out"
            reason = f"the task took longer than {self.task_timeout_s:.0f}s and was cancelled"
        except TrainingCancelled as exc:
            status = "cancelled"
            reason = f"TrainingCancelled: {exc} (run stopped or device shutting down)"
        except TaskRefused as exc:
            status, reason = "refused", error_reason(exc)
        except Exception as exc:
            status, reason = "failed", error_reason(exc)
            if not isinstance(exc, EdgeError):
                logger.error("the ClientApp raised", exc_info=exc)
        if not future.done():
            with contextlib.suppress(Exception):  # the error reply below says what happened
                future.result(timeout=CANCEL_GRACE_S)
            if not future.done():
                logger.error("the cancelled task is still running; its reply is an error")
        return status, reason, Message(Error(code=FAILED_CODE, reason=reason), reply_to=message)


def expiry_s() -> float:
    """Seconds after which the SuperNode fails a task whose executor went silent."""
    return float(HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL)
