"""The federated run: rounds driven through Flower's Grid, every global model released.

This is what the Flower ServerApp (:mod:`cloud.serverapp`) executes. It drives a
strategy from ``flwr.serverapp.strategy`` round by round itself, instead of calling
``Strategy.start``, because it needs things ``start`` does not offer:

* **never hang**: a round waits at most ``wait_for_nodes_s`` for devices, samples only
  devices that are connected (each device's current SuperNode, never a restarted
  device's stale one: :mod:`cloud.sampling`), and gives up on replies after ``round_timeout_s``
  (Flower's own sampling waits forever for ``min_available_nodes``);
* **resume**: a restarted cloud continues the unfinished run (same registry run id)
  from the newest version instead of starting over, releases that version first if
  it was registered but never released, and never registers a round twice; a run
  stopped by a cloud-side fault is ``interrupted`` (resumable), never ``failed``;
* **bookkeeping**: who was sampled, who replied, who timed out, per-device metrics;
* **release**: after every round the new global model is registered and the cloud's
  release signer (:mod:`cloud.signer`) signs and pushes it to the whole fleet over
  MQTT; the round waits while the broker is away (:mod:`cloud.releases`).
* **approval**: every message carries the fleet's signed approval of this run
  (:mod:`edge.run_approval`, content key ``edgefl-approval``), which the cloud
  supervisor wrote to ``data_dir/approvals/<run id>.json`` when it submitted the run;
  devices refuse messages without it.
* **after a rollback**: a round whose starting version a staged rollout rolled back
  trains from the fleet's last promoted version instead (:meth:`Aggregator.base_for_round`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, Strategy

from cloud.config import CloudSettings
from cloud.registry import ModelVersion, Registry
from cloud.releases import Releaser, release_weights
from cloud.sampling import DeviceNodes
from cloud.signer import SignerError
from edge.clientapp import arrays_to_record, record_to_arrays
from edge.run_approval import APPROVAL_KEY, RunApproval, wait_for_approval
from protos import wire_keys as keys

logger = logging.getLogger(__name__)

#: Seconds to wait for devices to say who they are (QUERY messages).
IDENTIFY_TIMEOUT_S = 20.0
#: Seconds a suspect node (sampled, never answered) gets to answer the identify query
#: once every other node has: a live device answers within a few; a dead one never.
SUSPECT_ANSWER_S = 8.0
#: Seconds between two pulls of the replies a round or an identify query waits for.
REPLY_POLL_S = 1.0
#: Registry run states a restarted cloud continues.
RESUMABLE_STATUSES = ("running", "interrupted")
#: Seconds to wait for the cloud supervisor's approval of this run (written right
#: after ``flwr run`` returns the run id, which can be after this ServerApp started).
APPROVAL_WAIT_S = 60.0
#: Stored rollouts looked through for the version a round would train from.
ROLLOUT_LOOKBACK = 50


def make_strategy(settings: CloudSettings) -> Strategy:
    run = settings.run
    common: dict[str, Any] = dict(
        fraction_train=run.fraction_train,
        fraction_evaluate=0.0,  # the cloud evaluates the global model itself
        min_train_nodes=run.min_nodes,
        min_evaluate_nodes=0,
        min_available_nodes=run.min_nodes,
    )
    if run.strategy == "fedavg":
        return FedAvg(**common)
    if run.strategy == "fedprox":
        return FedProx(**common, proximal_mu=run.proximal_mu)
    if run.strategy == "fedadam":
        return FedAdam(**common, eta=run.server_learning_rate, eta_l=run.learning_rate)
    if run.strategy == "fedmedian":
        return FedMedian(**common)
    raise ValueError(f"unknown strategy {run.strategy!r}")


class Evaluator:
    """Evaluates a global model on held-out digits with LiteRT (the cloud's own check)."""

    def __init__(self, settings: CloudSettings) -> None:
        from edge.litert_model import LiteRTModel

        self.model = LiteRTModel.load(settings.model.dir)
        self.data = None
        if settings.run.evaluation == "digits":
            from devices.datasets import load_digits

            layout = "image" if len(self.model.input_shape) == 3 else "flat"
            self.data = load_digits(layout=layout, seed=settings.run.seed).test  # type: ignore[arg-type]

    def initial_weights(self) -> dict[str, np.ndarray]:
        return self.model.get_weights()

    def __call__(self, weights: dict[str, np.ndarray]) -> dict[str, float]:
        if self.data is None:
            return {}
        self.model.set_weights(weights)
        result = self.model.evaluate(self.data.x, self.data.y)
        return {keys.EVAL_LOSS: float(result["loss"]), keys.EVAL_ACCURACY: float(result["accuracy"])}


@dataclass
class RoundOutcome:
    round: int
    version: int | None
    replied: list[str]
    dropped: list[str]
    metrics: dict[str, float]
    #: The new global weights (None when the round produced no version).
    weights: dict[str, np.ndarray] | None = None


def _sender_said_name(reply: Message) -> str | None:
    """The device id a reply names (``device`` record), or None for an error or no name."""
    if reply.has_error() or keys.DEVICE not in reply.content:
        return None
    return str(reply.content[keys.DEVICE].get(keys.DEVICE_ID, ""))


class _OnlyNodes:
    """A Grid whose ``get_node_ids`` lists only the given nodes (what the strategy samples
    from); everything else goes to the real grid."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid = grid
        self._node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class Aggregator:
    """Runs (or resumes) one federated run for ``settings`` on a Flower ``grid``."""

    def __init__(
        self,
        settings: CloudSettings,
        registry: Registry,
        releaser: Releaser,
        *,
        num_rounds: int | None = None,
        flower_run_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.releaser = releaser
        self.num_rounds = num_rounds or settings.run.num_rounds
        self.flower_run_id = flower_run_id
        self.strategy = make_strategy(settings)
        self.evaluate = Evaluator(settings)
        #: Which SuperNode is which device, and which are stale or in doubt (#20.5).
        self.nodes = DeviceNodes()
        self._skipped: list[int] = []
        self.approval: RunApproval | None = None

    def _approve(self, message: Message) -> Message:
        """Put the run's approval into ``message`` (devices refuse messages without one)."""
        if self.approval is None:
            if self.flower_run_id is None:
                raise RuntimeError("no Flower run id: the run cannot carry an approval")
            self.approval = wait_for_approval(
                self.settings.data_dir, int(self.flower_run_id), timeout=APPROVAL_WAIT_S
            )
        message.content[APPROVAL_KEY] = ConfigRecord(self.approval.to_record())  # type: ignore[arg-type]
        return message

    # -- run set-up --------------------------------------------------------------------------

    def _resume_point(self) -> tuple[int, int, dict[str, np.ndarray], int | None]:
        """(run id, first round to run, weights to start from, parent version)."""
        latest = self.registry.latest_version()
        run = self.registry.latest_run()
        if run is not None and run.status in RESUMABLE_STATUSES:
            if run.status != "running":
                self.registry.finish_run(run.id, "running")
            if latest is not None and latest.run_id == run.id:
                self._release_if_pending(latest)
                logger.info(
                    "resuming run %d after round %d (version %d)",
                    run.id,
                    latest.round,
                    latest.version,
                )
                return run.id, latest.round + 1, self._weights_of(latest.version), latest.version
            run_id = run.id  # interrupted before its first version: same run, from the top
        else:
            run_id = self.registry.start_run(
                num_rounds=self.num_rounds,
                strategy=self.settings.run.strategy,
                config={
                    "fraction_train": self.settings.run.fraction_train,
                    "min_nodes": self.settings.run.min_nodes,
                    "round_timeout_s": self.settings.run.round_timeout_s,
                    "local_epochs": self.settings.run.local_epochs,
                    "learning_rate": self.settings.run.learning_rate,
                },
                flower_run_id=self.flower_run_id,
            )
        if latest is not None:
            # A new run continues from the newest global model of the fleet.
            return run_id, 1, self._weights_of(latest.version), latest.version
        weights = self.evaluate.initial_weights()
        metrics = self.evaluate(weights)
        self.registry.record_evaluation(run_id, 0, metrics)
        initial = release_weights(
            registry=self.registry,
            releaser=self.releaser,
            model_dir=self.settings.model.dir,
            weights=weights,
            round=0,
            run_id=run_id,
            parent_version=None,
            metrics=metrics,
            wait_s=self.settings.run.release_wait_s,
        )
        return run_id, 1, weights, initial.version

    def _release_if_pending(self, latest: ModelVersion) -> None:
        """Release ``latest`` if the cloud stopped between registering and releasing it."""
        current = self.registry.current()
        if current is None or latest.version > current.version:
            logger.info("version %d was registered but not released: releasing it", latest.version)
            self.releaser.release_when_possible(
                latest.version, wait_s=self.settings.run.release_wait_s
            )

    def base_for_round(
        self, rnd: int, weights: dict[str, np.ndarray], parent: int | None
    ) -> tuple[dict[str, np.ndarray], int | None]:
        """The model round ``rnd`` trains from: ``weights`` (version ``parent``), unless a
        staged rollout rolled ``parent`` back; then the fleet's current version (the last
        promoted one), so a rejected model is not trained on further.

        Looked at when the round starts: a rollout still in its phases then does not
        change the round (the next candidate supersedes it). Recorded as a registry event
        ``round base reset`` from ``cloud``.
        """
        if parent is None:
            return weights, parent
        stored = self.registry.list_rollouts(ROLLOUT_LOOKBACK)
        if not any(r.version == parent and r.status == "rolled back" for r in stored):
            return weights, parent
        current = self.registry.current()
        if current is None or current.version == parent:
            return weights, parent
        logger.warning(
            "round %d trains from version %d, the fleet's promoted version: version %d was "
            "rolled back",
            rnd,
            current.version,
            parent,
        )
        from protos import codec

        self.registry.record_event(
            codec.DeviceEvent(
                device_id="cloud",
                timestamp_ms=int(time.time() * 1000),
                kind="round base reset",
                detail=f"round {rnd} trains from version {current.version}: "
                f"version {parent} was rolled back",
                version=current.version,
            )
        )
        return self._weights_of(current.version), current.version

    def _weights_of(self, version: int) -> dict[str, np.ndarray]:
        from protos import codec

        return dict(codec.package_from_bytes(self.registry.version_bytes(version)).weights)

    # -- devices ---------------------------------------------------------------------------

    def _wait_for_devices(self, grid: Grid) -> tuple[list[int], list[int]]:
        """(listed nodes, the current ones to sample from) for the next round.

        Waits up to ``wait_for_nodes_s`` until ``min_nodes`` devices answer through a
        current node: a restarted device's stale node, still listed, does not count.
        """
        deadline = time.monotonic() + self.settings.run.wait_for_nodes_s
        while True:
            nodes = list(grid.get_node_ids())
            current = self.current_nodes(nodes, self._identify(grid, nodes)) if nodes else []
            if len(current) >= self.settings.run.min_nodes or time.monotonic() >= deadline:
                return nodes, current
            time.sleep(1.0)

    def _exchange(
        self,
        grid: Grid,
        messages: list[Message],
        timeout: float,
        *,
        enough: Callable[[set[int]], bool] | None = None,
    ) -> dict[int, Message]:
        """Send ``messages`` and collect their replies, keyed by the node each was sent to.

        Replies are attributed by the message they answer, not by their sender: the
        SuperLink itself sends the "node unavailable" error for a node that went offline.
        Waits until every message is answered, ``timeout`` passed, or ``enough(nodes
        still waited for)`` says the rest does not matter; every reply's device name is
        learned as it arrives.
        """
        targets = [m.metadata.dst_node_id for m in messages]
        ids = list(grid.push_messages(messages))
        if len(ids) != len(targets) or not all(ids):
            # Flower returns no id for a message it refused (and none at all for a push
            # too large): those nodes count as not answering.
            logger.error("the SuperLink took %d of %d messages", sum(map(bool, ids)), len(targets))
        waiting = {mid: node for mid, node in zip(ids, targets, strict=False) if mid}
        replies: dict[int, Message] = {}
        deadline = time.monotonic() + timeout
        while waiting:
            for reply in grid.pull_messages(list(waiting)):
                node = waiting.pop(reply.metadata.reply_to_message_id, None)
                if node is not None:
                    replies[node] = reply
                    self._learn_name(node, reply)
            if not waiting or (enough is not None and enough(set(waiting.values()))):
                break
            if time.monotonic() >= deadline:
                break
            time.sleep(REPLY_POLL_S)
        return replies

    def _identify(self, grid: Grid, node_ids: Iterable[int]) -> set[int]:
        """Ask new and suspect nodes which device they are; returns those that did not answer.

        Stops waiting early once only suspects are left and each is superseded (its
        device answered through a newer node) or had ``SUSPECT_ANSWER_S`` to answer.
        """
        ask = self.nodes.to_ask(node_ids)
        if not ask:
            return set()
        messages = [
            self._approve(
                Message(
                    content=RecordDict({keys.CONFIG: ConfigRecord({})}),
                    message_type=MessageType.QUERY,
                    dst_node_id=n,
                )
            )
            for n in ask
        ]
        started = time.monotonic()

        def enough(waiting: set[int]) -> bool:
            # Only suspects left: a restarted device's old identity is not waited for,
            # nor, after a short grace, a node that went silent during the last round.
            return all(self.nodes.suspect(n) for n in waiting) and (
                all(self.nodes.superseded(n) for n in waiting)
                or time.monotonic() - started >= SUSPECT_ANSWER_S
            )

        replies = self._exchange(grid, messages, IDENTIFY_TIMEOUT_S, enough=enough)
        return {n for n in ask if n not in replies or _sender_said_name(replies[n]) is None}

    def _learn_name(self, node: int, reply: Message) -> str:
        device = _sender_said_name(reply)
        if device is not None:
            self.nodes.learn(node, device or f"node-{node}")
        return self.name(node)

    def current_nodes(self, node_ids: Iterable[int], silent: set[int]) -> list[int]:
        node_ids = list(node_ids)
        keep = self.nodes.current(node_ids, silent)
        skipped = sorted(set(node_ids) - set(keep))
        if skipped and skipped != self._skipped:
            logger.info(
                "not sampling %d stale or silent node(s): %s",
                len(skipped),
                ", ".join(f"{n} ({self.name(n)})" for n in skipped),
            )
        self._skipped = skipped
        return keep

    def name(self, node_id: int) -> str:
        return self.nodes.name(node_id)

    # -- rounds ----------------------------------------------------------------------------

    def run(self, grid: Grid) -> list[RoundOutcome]:
        run_id, first, weights, parent = self._resume_point()
        outcomes: list[RoundOutcome] = []
        try:
            for rnd in range(first, self.num_rounds + 1):
                weights, parent = self.base_for_round(rnd, weights, parent)
                outcome = self._round(grid, run_id, rnd, weights, parent)
                outcomes.append(outcome)
                if outcome.version is not None and outcome.weights is not None:
                    weights = outcome.weights
                    parent = outcome.version
        except SignerError:
            # The signer refused this run's version: asking again would not help.
            self.registry.finish_run(run_id, "failed")
            raise
        except BaseException:
            # A cloud-side fault (SuperLink, broker, signer away, a stop): the next
            # `cloud up` resumes the run, unless the operator stopped it meanwhile.
            if self.registry.get_run(run_id).status == "running":
                self.registry.finish_run(run_id, "interrupted")
            raise
        self.registry.finish_run(run_id, "completed")
        return outcomes

    def _round(
        self, grid: Grid, run_id: int, rnd: int, weights: dict[str, np.ndarray], parent: int | None
    ) -> RoundOutcome:
        run = self.settings.run
        nodes, current = self._wait_for_devices(grid)
        if not current:
            logger.warning(
                "round %d: no device %s after %.0fs; skipping",
                rnd,
                "answered" if nodes else "connected",
                run.wait_for_nodes_s,
            )
            self.registry.round_started(run_id, rnd, sampled=[])
            self.registry.round_finished(
                run_id, rnd, aggregated_metrics={}, version=None, dropped=[]
            )
            return RoundOutcome(rnd, None, [], [], {})
        # Sample only among connected devices, never waiting for more than are there.
        self.strategy.min_train_nodes = min(run.min_nodes, len(current))  # type: ignore[attr-defined]
        self.strategy.min_available_nodes = min(run.min_nodes, len(current))  # type: ignore[attr-defined]
        config = ConfigRecord(
            {
                keys.LOCAL_EPOCHS: run.local_epochs,
                keys.LEARNING_RATE: run.learning_rate,
                keys.SEED: run.seed + rnd,
            }
        )
        sample_from = cast(Grid, _OnlyNodes(grid, current))
        messages = [
            self._approve(m)
            for m in self.strategy.configure_train(
                rnd, arrays_to_record(weights), config, sample_from
            )
        ]
        sampled = {m.metadata.dst_node_id for m in messages}
        self.registry.round_started(run_id, rnd, sampled=[self.name(n) for n in sampled])
        logger.info(
            "round %d/%d: %d of %d devices sampled",
            rnd,
            self.num_rounds,
            len(sampled),
            len(current),
        )

        replies = self._exchange(grid, messages, run.round_timeout_s)
        good: list[Message] = []
        alive: set[int] = set()
        for node, reply in replies.items():
            device = self.name(node)
            if reply.has_error() and reply.metadata.src_node_id == SUPERLINK_NODE_ID:
                continue  # "node unavailable": the device never answered (dropped)
            alive.add(node)
            if reply.has_error():
                self.registry.round_reply(
                    run_id, rnd, device, ok=False, error=str(reply.error.reason)[:500]
                )
                continue
            record = reply.content.metric_records[keys.METRICS]
            metrics = {
                k: float(v)
                for k, v in record.items()
                if k != keys.NUM_EXAMPLES and isinstance(v, int | float)
            }
            num_examples = int(record[keys.NUM_EXAMPLES])  # type: ignore[arg-type]
            self.registry.round_reply(
                run_id, rnd, device, ok=True, num_examples=num_examples, metrics=metrics
            )
            good.append(reply)
        self.nodes.round_done(sampled, alive)
        # No sign of life: no reply at all, or the SuperLink's "node unavailable".
        dropped = sorted(self.name(n) for n in sampled - alive)
        replied = sorted(self.name(n) for n, r in replies.items() if not r.has_error())
        if dropped:
            logger.warning(
                "round %d: no reply within %.0fs (or node unavailable) from %s",
                rnd,
                run.round_timeout_s,
                ", ".join(dropped),
            )

        agg_arrays: ArrayRecord | None = None
        agg_metrics: MetricRecord | None = None
        if good:
            try:
                agg_arrays, agg_metrics = self.strategy.aggregate_train(rnd, good)
            except Exception as exc:  # inconsistent replies: record, keep the old model
                logger.error("round %d: aggregation failed: %s", rnd, exc)
        if agg_arrays is None:
            self.registry.round_finished(
                run_id, rnd, aggregated_metrics={}, version=None, dropped=dropped
            )
            return RoundOutcome(rnd, None, replied, dropped, {})

        new_weights = record_to_arrays(agg_arrays)
        metrics = {
            k: float(v) for k, v in (agg_metrics or {}).items() if isinstance(v, int | float)
        }
        metrics.update(self.evaluate(new_weights))
        self.registry.record_evaluation(
            run_id, rnd, {k: v for k, v in metrics.items() if k.startswith(keys.EVAL_PREFIX)}
        )
        version = release_weights(
            registry=self.registry,
            releaser=self.releaser,
            model_dir=self.settings.model.dir,
            weights=new_weights,
            round=rnd,
            run_id=run_id,
            parent_version=parent,
            metrics=metrics,
            participants=replied,
            wait_s=run.release_wait_s,
        )
        self.registry.round_finished(
            run_id, rnd, aggregated_metrics=metrics, version=version.version, dropped=dropped
        )
        logger.info(
            "round %d/%d: version %d released; accuracy %.3f",
            rnd,
            self.num_rounds,
            version.version,
            metrics.get(keys.EVAL_ACCURACY, float("nan")),
        )
        return RoundOutcome(rnd, version.version, replied, dropped, metrics, new_weights)
