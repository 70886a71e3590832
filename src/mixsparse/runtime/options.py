"""The sparse runtime's choices that the CLI and the config read without loading torch."""

from __future__ import annotations

#: how the LM head (and a tied embedding) may be held: float32 as stored, 16-bit, or int8 with one scale per row
HEAD_DTYPES = ("float32", "float16", "bfloat16", "int8")
