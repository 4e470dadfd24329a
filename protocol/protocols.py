"""Stream protocol ids. The trailing number is the wire version of that RPC."""

from __future__ import annotations

from libp2p.custom_types import TProtocol

PROTOCOL_VERSION = "2"
INFO = TProtocol("/trustswarm/info/1")
FORWARD = TProtocol("/trustswarm/forward/1")
BACKWARD = TProtocol("/trustswarm/backward/1")
INFERENCE = TProtocol("/trustswarm/inference/2")
# Chained inference: a hop passes its signed answer to the next hop (protocol/chained.py).
CHAIN = TProtocol("/trustswarm/chain/1")
# Fraud reports to a verifier: one DisagreementReport per stream, one verdict back.
REPORT = TProtocol("/trustswarm/report/1")
# Client audits to a verifier: one piece of evidence per stream (the report codec with a
# single answer), one short acknowledgement back; the verdict is never waited for.
AUDIT = TProtocol("/trustswarm/audit/1")

# DHT namespace for signed server announcements: keys are /trustswarm/<model>/<peer id>.
DHT_NAMESPACE = "trustswarm"
