"""The errors of the cloud package: one tree, rooted at :class:`CloudError`.

Every error the cloud side raises is a :class:`CloudError`, so the command line (and
any caller) can catch the package's errors in one clause. Where an error also is a
standard kind it keeps that base too (``ValueError``, ``RuntimeError``,
``LookupError``, ``TimeoutError``). The classes live next to the code that raises them::

    CloudError
    ├── config.ConfigError                a cloud.toml or override is invalid (all problems;
    │                                     also an edge.errors.ConfigError)
    ├── supervisor.StackError             `cloud up` could not start or keep a service up
    ├── cloud_lock.CloudRunningError      another cloud runs on this data directory
    ├── ports.PortInUseError              a configured port is taken by another process
    ├── broker.BrokerError                Mosquitto is missing, misconfigured or did not start
    ├── bridge.BridgeError                a bridge configuration Mosquitto would refuse
    ├── proxy.ProxyError                  nginx is missing, misconfigured or did not start
    ├── publisher.PublishError            the broker refused or did not acknowledge a release
    ├── rollout.RolloutError              a rollout action that does not apply (no such rollout)
    ├── rollout_state.RolloutStateError   a stored rollout state that cannot be resumed (ValueError)
    ├── signer.SignerError                the signer refused a release
    │   └── signer.SignerUnavailable      broker or signer away; asking again may work
    ├── registry.RegistryError            the registry database failed
    │   ├── registry.NotFoundError        no such run, version or device (LookupError)
    │   ├── registry.ArtifactCorruptError stored bytes no longer match their digest
    │   ├── registry.SchemaError          the schema is newer than this edgefl's
    │   └── registry.InvalidRecordError   a value the registry refuses to store (ValueError)
    ├── migrations.MigrationError         the schema cannot be brought to this revision
    │   └── migrations.UnknownRevisionError   a revision this edgefl does not know
    ├── fleet_monitor.FleetTimeout        the fleet did not reach a state in time (TimeoutError)
    ├── web.app.ActionError               a write action that cannot be done now (HTTP 409)
    ├── web.server.WebServerError         the web server did not start
    ├── authoring.build.BuildError        a model could not be converted to builtin LiteRT ops
    └── authoring.opcheck.OpCheckError    bytes that are not a TFLite flatbuffer (ValueError)

Errors of the parts the cloud runs on are the edge package's
(:mod:`edge.errors`: ``ProcessError``, ``FlowerError``, ``MqttError``) and the protos
package's (:class:`protos.errors.CodecError`); third-party errors (SQLAlchemy,
paho-mqtt) are mapped to these at the boundary.
"""

from __future__ import annotations

__all__ = ["CloudError"]


class CloudError(Exception):
    """Base class of every error raised by the cloud package."""
