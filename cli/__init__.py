"""The ``fedseq`` command: the composition root.

The library (``fedseq/``) imports no service; each service folder (``server/``, ``client/``,
``attacker/``, ``orchestrator/``) owns its servicer and a ``build(settings)``. This package is
the one place that knows them all: it parses flags and ``FEDSEQ_*`` variables into each service's
settings and calls its ``build`` (``fedseq serve-*``), launches a local federation of those
processes (``fedseq run``), runs the same experiment in one process with the same round engine
(``fedseq sim``), and drives reproductions (``fedseq reproduce``)."""

import fedseq  # noqa: E402,F401 - first: it turns gRPC's fork handlers off before any grpc import
