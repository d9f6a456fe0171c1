"""The torch dtype of each compute dtype name (the names themselves are defined in blocks.names)."""

from __future__ import annotations

import torch

from blocks.names import DTYPE_NAMES

# Each name is the torch attribute of its dtype, so the table is derived from the names, never written twice.
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}
