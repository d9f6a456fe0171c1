"""The names of the compute dtypes and weight quantizations a peer can serve with: plain strings, no torch.

The peer's settings (checked before torch is imported), the DHT's server records and the wire protocol all
accept exactly these; ``blocks.dtypes`` maps the dtype names to torch dtypes.
"""

from __future__ import annotations

import typing
from typing import Literal

DtypeName = Literal["float32", "bfloat16", "float16"]
QuantMode = Literal["none", "int8", "nf4"]

DTYPE_NAMES: tuple[str, ...] = typing.get_args(DtypeName)
QUANT_MODES: tuple[str, ...] = typing.get_args(QuantMode)
