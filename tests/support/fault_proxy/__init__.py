"""A fault layer in front of the emulators that behaves the way Google documents.

pstest and bqemulator are kinder than Google: they never answer with quota or rate
limit errors, never queue DML, show a new column to the Storage Write API at once, and
pstest neither enforces ordering keys nor counts delivery attempts. These proxies sit
between the pipeline's processes and the emulators and put Google's behaviour back,
each fault switched on by the test, for a count of calls or a number of seconds, so the
tests stay deterministic and take seconds:

- `rest.BigQueryRestProxy`: HTTP reverse proxy for BigQuery's REST API. Answers chosen
  calls with Google's error JSON (403 `quotaExceeded` / `rateLimitExceeded`, the DML
  queue's 400 `resourcesExceeded`, the concurrent-update 400 `invalidQuery`), delays
  calls, counts calls by API method and sums bytes processed from job statistics.
- `grpc_proxy.GrpcProxy`: generic gRPC forwarder (bytes in, bytes out). With a
  `StorageWriteFaults` it refuses AppendRows whose writer schema carries a column the
  write stream cannot see yet (`SCHEMA_MISMATCH_EXTRA_FIELDS`), for N seconds after the
  column was added; with a `pubsub.OrderingGate` it serves Pub/Sub's Subscriber
  service itself: ordering keys enforced, leases that expire, delivery attempts
  counted, and the subscription's dead-letter policy applied.
- `errors`: the error shapes, with the Google documentation each one follows.

Usage (see `tests/support/faults.py` for the scenarios):

    lag = SchemaVisibility(lag_seconds=10)
    with BigQueryRestProxy(emu.rest, schema=lag) as rest, GrpcProxy(emu.grpc, storage_write=StorageWriteFaults(lag)) as bq:
        rest.add(errors.quota_exceeded(), errors.QUERY_KINDS, times=4)
        env = {"BIGQUERY_EMULATOR_HOST": rest.address, "BIGQUERY_EMULATOR_GRPC_HOST": bq.address}
"""

from tests.support.fault_proxy import errors
from tests.support.fault_proxy.errors import GoogleError
from tests.support.fault_proxy.grpc_proxy import GrpcProxy
from tests.support.fault_proxy.pubsub import OrderingGate
from tests.support.fault_proxy.rest import BigQueryRestProxy, Rule
from tests.support.fault_proxy.storage_write import SchemaVisibility, StorageWriteFaults

__all__ = ["errors", "BigQueryRestProxy", "GoogleError", "GrpcProxy", "OrderingGate", "Rule", "SchemaVisibility", "StorageWriteFaults"]
