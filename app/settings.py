"""One `Settings` object for both processes, read from environment variables.

Every knob the README's configuration table lists lives here, so there is exactly one
place to look up a name, its default and its meaning.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    # --- API edge ---
    api_host: str = Field("127.0.0.1", description="Address the API binds to.")
    api_port: int = Field(8787, description="Port the API listens on.")
    max_body_bytes: int = Field(5 * 1024 * 1024, description="Largest request body accepted (after gzip decompression).")
    max_activities: int = Field(10_000, description="Most activities in one request.")
    max_columns: int = Field(10_000, description="Most columns in one activity (BigQuery's limit).")
    max_value_bytes: int = Field(1024 * 1024, description="Largest single value (string, bytes, record, geography).")
    max_record_depth: int = Field(15, description="Deepest nesting of a record value.")
    api_keys: str | None = Field(None, description="Comma-separated API keys (plain or `sha256:<hex>`); when set, ingest needs one.")
    api_keys_file: Path | None = Field(
        None, description="TOML file of scoped keys (`python -m app keys`); re-read on change; when set, ingest needs a key."
    )
    api_allow_unauthenticated: bool = Field(False, description="Allow binding a non-loopback address without API keys.")
    max_in_flight_requests: int = Field(256, description="Ingest requests handled at once; more get 503 + Retry-After (bounds memory).")
    publish_timeout_seconds: float = Field(10.0, description="How long the API waits for the broker before answering 503.")

    # --- tables under contract ---
    tables_file: Path | None = Field(
        None, description="TOML file of table contracts, PII policies and options (docs/contracts.md); reloaded on change."
    )

    tables_file_check_seconds: float = Field(
        0.5, ge=0, description="How often the API looks for a change of TABLES_FILE (one stat); 0: on every request."
    )
    pii_hmac_keys: str | None = Field(
        None, description="Versioned keys for pii = hmac, newest first: `v2:secret,v1:old` (the first is used)."
    )

    # --- where things live ---
    data_dir: Path = Field(Path("data"), description="Folder for the local broker, warehouse and dead-letter files.")
    broker: str = Field("local", description="Which broker: `local` (SQLite file) or `pubsub` (any registered backend).")
    warehouse: str = Field("duckdb", description="Which warehouse: `duckdb` (file) or `bigquery` (any registered backend).")
    duckdb_path: Path | None = Field(None, description="DuckDB file; default `$DATA_DIR/warehouse.duckdb`.")
    duckdb_memory_limit: str = Field("512MB", description="Cap on DuckDB's buffer pool in the subscriber (e.g. 128MB, 1GB).")
    duckdb_threads: int = Field(1, ge=1, description="DuckDB worker threads in the subscriber (appends gain nothing from more).")
    duckdb_block_size: int = Field(
        16384, ge=16384, le=262144,
        description="Block size of a DuckDB file the warehouse creates (a power of two, 16384-262144); existing files keep theirs.",
    )
    duckdb_storage_version: str = Field(
        "v1.2.0", description="DuckDB storage format of a file the warehouse creates (`storage_compatibility_version`); existing files keep theirs.",
    )
    duckdb_reopen_after_tables: int = Field(
        250, ge=1, description="The subscriber closes and reopens the DuckDB file once it has written this many distinct tables (DuckDB frees per-table memory only then)."
    )
    broker_path: Path | None = Field(None, description="Local broker file; default `$DATA_DIR/broker.sqlite`.")
    dead_letter_path: Path | None = Field(None, description="Dead-letter store; default `$DATA_DIR/dead_letters.sqlite`.")
    receipts_path: Path | None = Field(None, description="Delivery receipts; default `receipts.sqlite` next to the broker file.")
    receipt_retention_days: float = Field(7.0, gt=0, description="Days a batch's receipt is kept; then its lookup answers 410.")

    # --- delivery semantics ---
    ack_deadline_seconds: float = Field(30.0, description="Unacked messages are redelivered after this long.")
    max_delivery_attempts: int = Field(5, description="Attempts before a message is dead-lettered.")
    pull_max_messages: int = Field(500, description="Most messages the subscriber takes per pull.")
    retry_backoff_max_seconds: float = Field(30.0, description="Cap of the subscriber's exponential backoff on transient errors.")
    max_in_place_retry_seconds: float = Field(
        120.0, description="Longest the subscriber holds a table's messages while retrying transient errors in place "
        "(at most half the broker's lease); then it nacks them with a delay."
    )
    lag_warn_seconds: float = Field(
        300.0, gt=0, description="The subscriber's /readyz names tables whose oldest held message was published longer ago."
    )
    subscriber_workers: int = Field(4, ge=1, description="Tables applied at once (BigQuery); DuckDB applies one at a time.")
    table_cache_size: int = Field(
        2000, ge=1, description="Tables whose schema the subscriber keeps in memory (least recently used dropped first)."
    )
    subscriber_max_outstanding_messages: int = Field(2000, ge=1, description="Most messages pulled and not yet acked/nacked.")
    subscriber_max_outstanding_bytes: int = Field(
        100 * 1024 * 1024, ge=1, description="Most message bytes pulled and not yet acked/nacked."
    )
    subscriber_max_outstanding_messages_per_table: int = Field(
        1000, ge=1, description="Most messages one table holds of those (a stuck table leaves room for the others)."
    )

    # --- subscriber admin port (metrics, read path for `query`) ---
    subscriber_host: str = Field("127.0.0.1", description="Address of the subscriber's admin HTTP port.")
    subscriber_port: int = Field(8788, description="Subscriber's admin HTTP port (metrics, health, query).")

    # --- Google Cloud ---
    gcp_project: str = Field("local-project", description="Google Cloud project id.")
    gcp_project_number: int | None = Field(
        None, gt=0, description="Project number; lets `pubsub.sh` grant the Pub/Sub service agent its dead-letter roles."
    )
    pubsub_topic: str = Field("user-activities", description="Pub/Sub topic the API publishes to.")
    pubsub_subscription: str = Field("user-activities-sub", description="Pub/Sub subscription the subscriber pulls.")
    pubsub_ordering: bool = Field(True, description="Publish with ordering key = table (about 1 MB/s per table).")
    pubsub_max_delivery_attempts: int = Field(
        100, ge=5, le=100, description="Pub/Sub deliveries before Pub/Sub itself dead-letters a message (5..100)."
    )
    pubsub_endpoint: str | None = Field(
        None, description="Locational Pub/Sub endpoint for both processes, e.g. `us-east1-pubsub.googleapis.com:443` (ordering holds within one region)."
    )
    pubsub_max_lease_seconds: float = Field(
        600.0, description="The subscriber extends a held message's lease up to this long; then Pub/Sub redelivers it."
    )
    bigquery_dataset: str = Field("user_activity", description="BigQuery dataset the tables live in.")
    bigquery_location: str = Field("US", description="Location of the BigQuery dataset and its query jobs (e.g. US, EU, europe-west1).")
    bigquery_emulator_host: str | None = Field(None, description="host:port of a BigQuery REST emulator (anonymous credentials).")
    bigquery_emulator_grpc_host: str | None = Field(None, description="host:port of the emulator's Storage Write gRPC endpoint.")
    bigquery_insert_mode: Literal["storage_write", "insert_all"] = Field(
        "storage_write", description="`storage_write` (PENDING streams for rows, default stream for markers) or legacy `insert_all`."
    )
    bigquery_write_connections: int = Field(
        8, ge=1, le=64, description="Storage Write connections one subscriber keeps open at most, shared by all tables (closed after 60 s idle)."
    )
    bigquery_write_timeout_seconds: float = Field(
        60.0, gt=0, description="Our deadline for one Storage Write call (append, stream create, finalize, commit), connection wait included."
    )
    bigquery_table_cache_size: int = Field(
        1000, ge=1, description="Tables whose schema one subscriber keeps cached; the least recently used beyond this are forgotten."
    )
    bigquery_partitioning: Literal["day", "none"] = Field(
        "day", description="User tables: `day` = partitioned by ingestion day (`_PARTITIONTIME`), `none` = unpartitioned."
    )
    bigquery_clustering: str = Field(
        "", description="Comma-separated columns (up to 4) to cluster user tables on, where a table has them; empty: none."
    )

    # --- logging and tracing ---
    log_level: str = Field("INFO", description="Log level for both processes.")
    otel_exporter_otlp_endpoint: str | None = Field(
        None, description="OTLP/HTTP base URL (e.g. http://collector:4318); when set, both processes export trace spans."
    )

    @field_validator("warehouse")
    @classmethod
    def _registered_warehouse(cls, name: str) -> str:
        from app.warehouse.registry import check_name  # the registry imports backends lazily

        return check_name(name)

    @field_validator("broker")
    @classmethod
    def _registered_broker(cls, name: str) -> str:
        from app.broker.registry import check_name  # the registry imports backends lazily

        return check_name(name)

    @field_validator("duckdb_block_size")
    @classmethod
    def _power_of_two(cls, size: int) -> int:
        if size & (size - 1):
            raise ValueError(f"DUCKDB_BLOCK_SIZE must be a power of two, got {size}")
        return size

    @field_validator("duckdb_storage_version")
    @classmethod
    def _storage_version(cls, version: str) -> str:
        if not re.fullmatch(r"v\d+\.\d+\.\d+|latest", version):
            raise ValueError(f"DUCKDB_STORAGE_VERSION must look like v1.2.0, got {version!r}")
        return version

    @property
    def duckdb_file(self) -> Path:
        return self.duckdb_path or self.data_dir / "warehouse.duckdb"

    @property
    def broker_file(self) -> Path:
        return self.broker_path or self.data_dir / "broker.sqlite"

    @property
    def receipts_file(self) -> Path:
        return self.receipts_path or self.broker_file.with_name("receipts.sqlite")

    @property
    def dead_letter_file(self) -> Path:
        return self.dead_letter_path or self.data_dir / "dead_letters.sqlite"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
