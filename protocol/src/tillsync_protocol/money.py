"""Exact value types shared by every message: money, quantities, rates, identifiers.

Money is an integer number of minor units (cents, haléře) beside an ISO 4217 currency
code; quantities are integer thousandths; exchange rates are decimal strings. No float
appears anywhere in the protocol.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated

from pydantic import Field, StrictInt, StrictStr

__all__ = [
    "Amount",
    "BasisPoints",
    "Code",
    "Count",
    "Currency",
    "DecimalRate",
    "EntityId",
    "NonNegativeAmount",
    "PositiveAmount",
    "QuantityMilli",
    "Seq",
    "Text",
    "UnixMillis",
    "Uuid",
    "WireId",
    "rate_to_decimal",
]

MAX_AMOUNT = 10**15

Amount = Annotated[StrictInt, Field(ge=-MAX_AMOUNT, le=MAX_AMOUNT)]
"""Signed money in minor units of the message's currency."""
NonNegativeAmount = Annotated[StrictInt, Field(ge=0, le=MAX_AMOUNT)]
PositiveAmount = Annotated[StrictInt, Field(ge=1, le=MAX_AMOUNT)]
QuantityMilli = Annotated[StrictInt, Field(ge=-(10**12), le=10**12)]
"""A quantity in thousandths: 1500 is 1.5 pieces or 1.5 kg."""
BasisPoints = Annotated[StrictInt, Field(ge=0, le=100_000)]
"""A percentage in hundredths of a percent: 2100 is 21 %."""
Count = Annotated[StrictInt, Field(ge=0, le=2**53)]
Seq = Annotated[StrictInt, Field(ge=1, le=2**63 - 1)]
UnixMillis = Annotated[StrictInt, Field(ge=0, le=253_402_300_799_999)]
"""Milliseconds since 1970-01-01T00:00:00Z."""
Currency = Annotated[StrictStr, Field(pattern=r"^[A-Z]{3}$")]
DecimalRate = Annotated[StrictStr, Field(pattern=r"^[0-9]{1,12}(\.[0-9]{1,12})?$")]
"""A positive exact decimal written as a string, such as ``"25.125"``."""
WireId = Annotated[StrictStr, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]
"""A register or center id; also used in routing keys and broker user names."""
Uuid = Annotated[
    StrictStr, Field(pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
]
EntityId = Annotated[StrictStr, Field(min_length=1, max_length=64)]
Code = Annotated[StrictStr, Field(min_length=1, max_length=64)]
Text = Annotated[StrictStr, Field(max_length=1000)]


def rate_to_decimal(rate: str) -> Decimal:
    """Read a :data:`DecimalRate` exactly."""
    return Decimal(rate)
