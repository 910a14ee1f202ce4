"""ServerApp: one message per device for every step in STEPS, every reply recorded.

Each step is a TRAIN message that is wrong in one way (or, last, right). The reply of
each device (its error code and reason, or its metrics) is appended as a JSON line to
the run config's ``results-file``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid, ServerApp

from edge.run_approval import APPROVAL_KEY, RunApproval, wait_for_approval

app = ServerApp()

STEPS = (
    "no-approval",
    "forged-approval",
    "other-run-approval",
    "unknown-content-key",
    "weights-mismatch",
    "trainer-raises",
    "good",
)


def _content(step: str, weights: dict[str, np.ndarray], approval: dict, other: dict) -> RecordDict:
    arrays = {k: np.array(v) for k, v in weights.items()}
    config = {"local-epochs": 1, "learning-rate": 0.1, "server-round": 100 + STEPS.index(step)}
    if step == "weights-mismatch":
        first = sorted(arrays)[0]
        arrays[first] = np.zeros((3, 3), dtype=np.float32)
    if step == "trainer-raises":
        config["local-epochs"] = 5000  # the Trainer refuses more than 1000 epochs
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}),
            "config": ConfigRecord(config),
        }
    )
    if step == "forged-approval":
        forged = dict(approval)
        sig = bytearray(forged["signature"])
        sig[0] ^= 0xFF
        forged["signature"] = bytes(sig)
        content[APPROVAL_KEY] = ConfigRecord(forged)
    elif step == "other-run-approval":
        content[APPROVAL_KEY] = ConfigRecord(other)
    elif step != "no-approval":
        content[APPROVAL_KEY] = ConfigRecord(approval)
    if step == "unknown-content-key":
        content["payload"] = ConfigRecord({"run-this": "rm -rf /"})
    return content


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    weights = dict(np.load(str(cfg["weights"])))
    approval = wait_for_approval(Path(str(cfg["data-dir"])), context.run_id, timeout=60).to_record()
    other = RunApproval.from_json(Path(str(cfg["other-run-approval"])).read_text()).to_record()
    results = Path(str(cfg["results-file"]))
    deadline = time.monotonic() + 60
    nodes = list(grid.get_node_ids())
    while len(nodes) < int(cfg["nodes"]) and time.monotonic() < deadline:  # type: ignore[arg-type]
        time.sleep(1)
        nodes = list(grid.get_node_ids())
    for step in STEPS:
        messages = [
            Message(
                content=_content(step, weights, approval, other),
                message_type=MessageType.TRAIN,
                dst_node_id=node,
            )
            for node in nodes
        ]
        replies = list(grid.send_and_receive(messages, timeout=90))
        with results.open("a", encoding="utf-8") as fh:
            for reply in replies:
                line: dict[str, object] = {"step": step, "node": reply.metadata.src_node_id}
                if reply.has_error():
                    line["code"] = int(reply.error.code)
                    line["reason"] = str(reply.error.reason)
                else:
                    line["device"] = str(reply.content["device"]["device-id"])
                    line["metrics"] = dict(reply.content["metrics"])
                fh.write(json.dumps(line) + "\n")
            fh.write(json.dumps({"step": step, "replies": len(replies), "sent": len(nodes)}) + "\n")
