"""The names of the update codecs (``--codec``), in the order of the codec registry
(``fedseq/codec/registry.py`` ``CODECS``), without importing it.

The registry is torch code; the run config (fedseq/config.py) checks a ``codec`` key against these
names, and the ``fedseq`` launcher builds and checks its config without loading torch. The
registry refuses to import when its table and this tuple differ, so they cannot drift apart: a new
codec is its module, its line in ``CODECS`` and its name here (docs/architecture.md, "An update
codec")."""

from __future__ import annotations

#: The names of the registered codecs, in registry order: the values of the run's ``codec`` key.
CODEC_NAMES: tuple[str, ...] = ("dense-fp32", "dense-fp16", "dense-bf16", "sparse-fp32", "sparse-fp16", "int8-row")
