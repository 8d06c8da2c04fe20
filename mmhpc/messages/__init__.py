"""Control messages, one module per destination (msgpack dataclasses, one codec).

- `common`: any rank (abort, heartbeat, shutdown, errors, NIXL metadata).
- `to_encode`, `to_prefill`, `to_decode`, `to_aggregated`, `to_frontend`: what each role
  receives.
Importing this package registers every message with `mmhpc.transport.codec`.
"""
from mmhpc.messages import (  # noqa: F401
    common, to_aggregated, to_decode, to_encode, to_frontend, to_prefill)
