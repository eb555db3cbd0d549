"""The dtypes a span can run in and the quantizations of its weights, by the names configs and the wire use."""
from typing import Literal

import torch

DTypeName = Literal["float32", "bfloat16", "float16"]
QuantName = Literal["none", "int8", "int4"]  # swarm/quantized.py

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def to_torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None
