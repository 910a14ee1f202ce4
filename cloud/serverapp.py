"""Flower ServerApp entry point (``cloud.serverapp:app``).

The SuperLink runs it for each submitted run. The run config names the cloud
settings file (``cloud-config``), which ``edgefl cloud up`` writes with the actual
ports of the broker it started; ``num-rounds`` (0 = from the settings) overrides the
number of rounds. Releases go through the release signer of ``cloud up``
(:class:`cloud.signer.SignerClient` on ``data_dir/signer/signer.sock``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from cloud import config as cloud_config
from cloud.aggregator import Aggregator
from cloud.registry import Registry
from cloud.signer import SignerClient

logger = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings_path = str(context.run_config.get("cloud-config", ""))
    if not settings_path:
        raise RuntimeError("run config lacks cloud-config: submit runs with `edgefl cloud up`")
    settings = cloud_config.load(Path(settings_path))
    num_rounds = int(context.run_config.get("num-rounds", 0)) or None  # type: ignore[arg-type]
    logging.getLogger("cloud").setLevel(logging.INFO)
    registry = Registry(settings.registry_url)
    try:
        # Releases are signed and published by the signer inside `cloud up`: this
        # process never loads the fleet's signing key.
        Aggregator(
            settings,
            registry,
            SignerClient(settings.data_dir),
            num_rounds=num_rounds,
            flower_run_id=str(context.run_id),
        ).run(grid)
    finally:
        registry.close()
