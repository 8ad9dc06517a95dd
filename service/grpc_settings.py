"""The gRPC server's connection settings that a mesh relies on: keepalive, connection age, streams.

- **Keepalive** (gRPC's keepalive guide, gRFC A8): the server pings a connection that has been
  quiet for `keepalive_time` and closes it when no answer comes within `keepalive_timeout`, so a
  client that vanished (a node gone, a NAT entry dropped) stops holding its calls' slots. With
  `permit_without_calls` the server also pings idle connections and accepts clients' pings on them
  (a client that keeps its channel warm would otherwise get GOAWAY "too_many_pings"), as often as
  every `min_client_ping_interval`.
- **Connection age** (gRFC A9): after `max_connection_age` the server sends GOAWAY and the client
  opens a new connection for its next calls, so that replicas added by a scale-out get their share
  of long-lived clients (the REST adapter is one). Calls already running keep the old connection for
  `max_connection_age_grace`, which must outlast the longest stream; then they are cut. gRPC adds
  its own jitter to the age, so that clients do not all reconnect at once.
- **Concurrent streams** per connection: 0 leaves gRPC's default (no limit); the queue's own bound
  (--max-waiting) refuses excess calls with RESOURCE_EXHAUSTED either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ConnectionSettings:
    keepalive_time: float = 60.0
    keepalive_timeout: float = 20.0
    permit_without_calls: bool = True
    # gRFC A8 asks clients not to ping more often than every 10 s; a stricter server would close
    # the connection of a client that follows it.
    min_client_ping_interval: float = 10.0
    # Long enough that a busy adapter does not reconnect often, short enough that a new replica gets
    # traffic within the half hour.
    max_connection_age: float = 1800.0
    # Outlasts a full-context stream on a loaded CPU replica (docs/operations.md).
    max_connection_age_grace: float = 600.0
    max_concurrent_streams: int = 0

    def server_options(self) -> list[tuple[str, Any]]:
        """The settings as grpc.aio.server options (gRPC core's channel arguments)."""
        options: list[tuple[str, Any]] = [
            ("grpc.keepalive_time_ms", _ms(self.keepalive_time)),
            ("grpc.keepalive_timeout_ms", _ms(self.keepalive_timeout)),
            ("grpc.keepalive_permit_without_calls", int(self.permit_without_calls)),
            # The server's own pings on a connection without data are not capped at two.
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.http2.min_ping_interval_without_data_ms", _ms(self.min_client_ping_interval)),
        ]
        if self.max_connection_age > 0:
            options += [
                ("grpc.max_connection_age_ms", _ms(self.max_connection_age)),
                ("grpc.max_connection_age_grace_ms", _ms(self.max_connection_age_grace)),
            ]
        if self.max_concurrent_streams > 0:
            options.append(("grpc.max_concurrent_streams", self.max_concurrent_streams))
        return options


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
