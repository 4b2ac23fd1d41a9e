"""Google Cloud Pub/Sub backend, split by role.

- `broker`: `PubSubBroker`, the `Broker` interface over the others, and its capabilities;
- `clients`: client construction (emulator, `PUBSUB_ENDPOINT`) and the IAM readiness probe;
- `publisher`: publish with bounded retries, dead-letter forwarding;
- `pull`: the subscriber side, a StreamingPull stream + lease keeper (see its docstring
  for why a stream, and why not the library's callback API);
- `settle`: what an ack or lease extension did to each ack id (exactly-once delivery);
- `ordering`: resuming paused ordering keys (publisher) and the per-key gate (subscriber);
- `deadletters`: listing and replaying what Pub/Sub itself dead-lettered.

Neither process needs a metadata `get` to start or to be ready: readiness asks IAM's
TestIamPermissions for the one permission the process needs (`pubsub.topics.publish`
for the API, `pubsub.subscriptions.consume` for the subscriber).

Backlog size is a Cloud Monitoring metric (`subscription/num_undelivered_messages`), not
an API call: `backlog()` returns None.
"""

from app.broker.pubsub.broker import PubSubBroker
from app.broker.pubsub.clients import (
    DEAD_LETTER_SUFFIX,
    client_kwargs,
    emulator_host,
    make_publisher,
    make_subscriber,
)

__all__ = [
    "DEAD_LETTER_SUFFIX",
    "PubSubBroker",
    "client_kwargs",
    "emulator_host",
    "make_publisher",
    "make_subscriber",
]
