"""The embedded default broker: one SQLite file (WAL) shared by the API, the subscriber and the CLI.

Split by role, one small class per concern:

* `store` - the file: schema, connections, taking the write lock, deliverable keys.
* `writer.GroupCommitWriter` - the publish side: a bounded queue and one thread that
  commits every queued request in one fsynced transaction (group commit), with
  idempotency keys and the file's maintenance.
* `leases.LeaseStore` - the subscriber side: leases per key (FIFO, runs of consecutive
  messages within a byte budget), ack, nack with delay, backlog.
* `broker.LocalBroker` - the `Broker` interface composing the two, plus readiness.

Acked messages are deleted; freed pages are reused, the WAL is truncated and the file
shrunk (incremental vacuum) when the writer is idle.
"""

from app.broker.local.broker import LocalBroker

__all__ = ["LocalBroker"]
