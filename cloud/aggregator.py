"""The federated run: rounds driven through Flower's Grid, every global model released.

This is what the Flower ServerApp (:mod:`cloud.serverapp`) executes. It drives a
strategy from ``flwr.serverapp.strategy`` round by round itself, instead of calling
``Strategy.start``, because it needs things ``start`` does not offer:

* **never hang**: a round waits at most ``wait_for_nodes_s`` for devices, samples only
  devices that are connected, and gives up on replies after ``round_timeout_s``
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
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, Strategy

from cloud.config import CloudSettings
from cloud.registry import ModelVersion, Registry
from cloud.releases import Releaser, release_weights
from cloud.signer import SignerError
from edge.clientapp import arrays_to_record, record_to_arrays
from edge.run_approval import APPROVAL_KEY, RunApproval, wait_for_approval
from protos import wire_keys as keys

logger = logging.getLogger(__name__)

#: Seconds to wait for devices to say who they are (QUERY messages).
IDENTIFY_TIMEOUT_S = 20.0
#: Registry run states a restarted cloud continues.
RESUMABLE_STATUSES = ("running", "interrupted")
#: Seconds to wait for the cloud supervisor's approval of this run (written right
#: after ``flwr run`` returns the run id, which can be after this ServerApp started).
APPROVAL_WAIT_S = 60.0


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


def newest_nodes(
    node_ids: Iterable[int], names: dict[int, str], named_at: dict[int, int], silent: set[int]
) -> list[int]:
    """The nodes worth sampling: each device's newest node, none that did not answer.

    A device that restarted comes back as a new SuperNode while the SuperLink still lists
    its old one as online for up to two missed heartbeats; sampling the old one makes the
    round wait for its timeout. So of several nodes naming the same device (``names``)
    only the one that named itself last (highest ``named_at``) is kept, and a node in
    ``silent`` (it did not say who it is this round) sits the round out.
    """
    newest: dict[str, int] = {}
    for node in node_ids:
        if node in silent:
            continue
        name = names.get(node, f"node-{node}")
        other = newest.get(name)
        if other is None or named_at.get(node, 0) > named_at.get(other, 0):
            newest[name] = node
    return sorted(newest.values())


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
        self.names: dict[int, str] = {}
        #: When each node last said which device it is (a counter: higher is newer).
        self._named_at: dict[int, int] = {}
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

    def _weights_of(self, version: int) -> dict[str, np.ndarray]:
        from protos import codec

        return dict(codec.package_from_bytes(self.registry.version_bytes(version)).weights)

    # -- devices ---------------------------------------------------------------------------

    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        deadline = time.monotonic() + self.settings.run.wait_for_nodes_s
        nodes = list(grid.get_node_ids())
        while len(nodes) < self.settings.run.min_nodes and time.monotonic() < deadline:
            time.sleep(1.0)
            nodes = list(grid.get_node_ids())
        return nodes

    def _identify(self, grid: Grid, node_ids: Iterable[int]) -> set[int]:
        """Ask unnamed nodes which device they are; returns the nodes that did not answer."""
        unknown = [n for n in node_ids if n not in self.names]
        if not unknown:
            return set()
        messages = [
            self._approve(
                Message(
                    content=RecordDict({keys.CONFIG: ConfigRecord({})}),
                    message_type=MessageType.QUERY,
                    dst_node_id=n,
                )
            )
            for n in unknown
        ]
        for reply in grid.send_and_receive(messages, timeout=IDENTIFY_TIMEOUT_S):
            self._learn_name(reply)
        return {n for n in unknown if n not in self.names}

    def _learn_name(self, reply: Message) -> str:
        node = reply.metadata.src_node_id
        if not reply.has_error() and keys.DEVICE in reply.content:
            name = str(reply.content[keys.DEVICE].get(keys.DEVICE_ID, "")) or f"node-{node}"
            self.names[node] = name
            self._named_at[node] = len(self._named_at) + 1
        return self.name(node)

    def current_nodes(self, node_ids: Iterable[int], silent: set[int]) -> list[int]:
        keep = newest_nodes(node_ids, self.names, self._named_at, silent)
        skipped = sorted(set(node_ids) - set(keep))
        if skipped:
            logger.info(
                "not sampling %d stale or silent node(s): %s",
                len(skipped),
                ", ".join(f"{n} ({self.name(n)})" for n in skipped),
            )
        return keep

    def name(self, node_id: int) -> str:
        return self.names.get(node_id, f"node-{node_id}")

    # -- rounds ----------------------------------------------------------------------------

    def run(self, grid: Grid) -> list[RoundOutcome]:
        run_id, first, weights, parent = self._resume_point()
        outcomes: list[RoundOutcome] = []
        try:
            for rnd in range(first, self.num_rounds + 1):
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
        nodes = self._wait_for_nodes(grid)
        if not nodes:
            logger.warning(
                "round %d: no device connected after %.0fs; skipping", rnd, run.wait_for_nodes_s
            )
            self.registry.round_started(run_id, rnd, sampled=[])
            self.registry.round_finished(
                run_id, rnd, aggregated_metrics={}, version=None, dropped=[]
            )
            return RoundOutcome(rnd, None, [], [], {})
        silent = self._identify(grid, nodes)
        current = self.current_nodes(nodes, silent) or nodes
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

        replies = list(grid.send_and_receive(messages, timeout=run.round_timeout_s))
        good: list[Message] = []
        for reply in replies:
            device = self._learn_name(reply)
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
        answered = {r.metadata.src_node_id for r in replies}
        dropped = sorted(self.name(n) for n in sampled - answered)
        replied = sorted(self.name(r.metadata.src_node_id) for r in good)
        if dropped:
            logger.warning(
                "round %d: no reply within %.0fs from %s",
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
