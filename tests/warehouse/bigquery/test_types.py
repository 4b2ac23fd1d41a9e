"""The type mapper: Arrow columns as BigQuery takes them (app/warehouse/bigquery/types.py). No emulator needed."""

from __future__ import annotations

from decimal import Decimal

import pyarrow as pa
import pytest

from app.schema.types import TYPE_NAMES, TYPES


@pytest.mark.parametrize("emulator", [False, True], ids=["google", "emulator-override"])
def test_arrow_columns_are_what_the_storage_write_api_takes(emulator: bool) -> None:
    # Rows go out in the type table's Arrow types; only BIGNUMERIC changes form (Google
    # takes decimal256(76, 38); the emulator's STRING column keeps the canonical text),
    # and the conversion must be exact for all 76 digits.
    from app.schema.columnar import to_arrow
    from app.warehouse.bigquery.types import TypeMapper

    from tests.support.bqemulator import EMULATOR_TYPE_OVERRIDES

    mapper = TypeMapper(EMULATOR_TYPE_OVERRIDES if emulator else None)
    for typ in TYPE_NAMES:
        if typ != "bignumeric":
            assert mapper.arrow_type(typ) == TYPES[typ].arrow_type
            column = to_arrow(typ, [None])
            assert mapper.arrow_column(typ, column) is column  # sent as it is
    big = ["-" + "9" * 38 + "." + "1234567890" * 3 + "12345678", "0." + "0" * 37 + "1", "0", None]
    sent = mapper.arrow_column("bignumeric", to_arrow("bignumeric", big))
    if emulator:
        assert sent.type == pa.string() and sent.to_pylist() == big
    else:
        assert sent.type == pa.decimal256(76, 38)
        assert sent.to_pylist() == [None if v is None else Decimal(v) for v in big]
