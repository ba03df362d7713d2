"""The ``fedseq`` command: one entry point, one subcommand per job.

    fedseq run                   networked federation on one machine (Redis, server, workers, orchestrator)
    fedseq sim                   the same experiment in one process
    fedseq check                 build a run's data, model, rule and attack; exit 2 saying what is wrong
    fedseq serve-server|serve-client|serve-attacker|serve-orchestrator   one service (compose)
    fedseq data                  dataset statistics
    fedseq reproduce SUITE       the paper's tables and figure (table1, table3, table4, table5, figure2) -> docs/results/
    fedseq report RUN_DIR...     print results bundles and communication ledgers, plot bytes per round
    fedseq certs DIR             a certificate authority and one mTLS certificate per service role
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace

from fedseq.config import ConfigError

from .flags import add_experiment_flags, experiment_config
from .tracking import add_track_flag, open_tracker


def _setup_logging(level: str, fmt: str = "text", service: str = "") -> None:
    from fedseq.observe import set_context, setup_logging

    if fmt not in ("text", "json"):
        raise ConfigError(f"--log-format must be text or json, got {fmt!r}")
    setup_logging(level, fmt)
    set_context(service=service)


def cmd_sim(args: argparse.Namespace) -> int:
    from cli.sim import run_inprocess

    cfg = experiment_config(args, quickstart=True)
    tracker = open_tracker(args.track)  # before the run: a bad --track or no MLflow exits 2 now
    out = args.out or os.path.join("runs", f"sim-{cfg.dataset.replace('/', '_')}-{cfg.model}")
    run_inprocess(cfg, out)
    print(f"results: {os.path.join(out, 'results.json')}")
    return tracker.log_single(out) if tracker is not None else 0


def cmd_run(args: argparse.Namespace) -> int:
    from cli.launcher import LaunchSettings, launch, run_folder

    cfg = experiment_config(args, quickstart=True)
    tracker = open_tracker(args.track)  # before the run: a bad --track or no MLflow exits 2 now
    if cfg.procs != 1:
        raise ConfigError(f"procs {cfg.procs}: --procs is fedseq sim's; fedseq run spreads the users over "
                          "--workers processes")
    settings = LaunchSettings(workers=args.workers, redis_url=redis_url_from(args), out_dir=args.out,
                              attackers=args.attackers, round_timeout=args.round_timeout, log_dir=args.log_dir,
                              insecure=args.insecure)
    if tracker is None:
        return launch(cfg, settings)
    cfg, out = run_folder(cfg, settings)  # the folder launch() would pick, to read its bundle after
    return tracker.log_single(out, launch(cfg, replace(settings, out_dir=str(out))))


def cmd_check(args: argparse.Namespace) -> int:
    """Build the run's data, model, rule and attack as every runner does first (cli/plugins.py
    ``prepare``): exit 0, or 2 with what is wrong. ``fedseq run`` runs it forked from its zygote
    (cli/launcher.py), so that the launcher never imports torch."""
    from .plugins import prepare

    cfg = experiment_config(args, quickstart=True)
    p = prepare(cfg)
    s = p.setup
    print(f"fedseq check: ok: {cfg.dataset} ({s.dataset.num_users} users, {s.dataset.num_items} items) / {cfg.model}, "
          f"rule {cfg.defense}, attack {cfg.attack}"
          + (f" ({len(s.malicious_users)} malicious clients, targets {list(s.targets)})" if p.adversary else ""))
    return 0


def redis_url_from(args: argparse.Namespace) -> str | None:
    """``--redis-url``, else ``FEDSEQ_REDIS_URL``. A password on the command line is refused: every
    local user sees a process's argv (``ps``); the environment is the process owner's only."""
    from urllib.parse import urlsplit

    if args.redis_url:
        if urlsplit(args.redis_url).password:
            raise ConfigError("--redis-url carries a password, which every local user can read in the process list; "
                              "pass the URL in the environment instead: FEDSEQ_REDIS_URL=redis://... fedseq run ...")
        return args.redis_url
    return os.environ.get("FEDSEQ_REDIS_URL") or None


def cmd_certs(args: argparse.Namespace) -> int:
    from fedseq.tls import DEFAULT_HOSTS, DEFAULT_NAMES, Identity, TLSError, make_certs, parse_names

    rostered = args.clients is not None or args.attackers is not None or args.spares
    if args.unsharded and not rostered:
        raise ConfigError("--unsharded describes the roster: give --clients N and/or --attackers M with it")
    for flag, n in (("--clients", args.clients), ("--attackers", args.attackers), ("--spares", args.spares)):
        if n is not None and n < 0:
            raise ConfigError(f"{flag} {n}: must be 0 or more")
    roster = None
    try:
        names = parse_names(args.name) if args.name else None
        if rostered:
            from fedseq import roster as roster_mod

            try:  # check the roster before any certificate is written
                roster = roster_mod.make(args.clients or 0, args.attackers or 0, args.spares or 0,
                                         sharded=not args.unsharded)
            except roster_mod.RosterError as e:
                raise ConfigError(str(e)) from None
            # the services' certificates (or the --name ones), and one of its own for every worker: no
            # shared `worker` certificate
            names = dict(names) if names is not None else {n: r for n, r in DEFAULT_NAMES.items() if r != "worker"}
            for w in roster.names():
                if names.get(w, "worker") != "worker":
                    raise ConfigError(f"--name {w}:{names[w]}: {w} is a worker identity of the roster (role worker)")
                names[w] = "worker"
        hosts = [*DEFAULT_HOSTS, *(h.strip() for h in (args.hosts or "").split(",") if h.strip())]
        made = make_certs(args.dir, names, hosts=hosts, days=args.days)
    except TLSError as e:
        raise ConfigError(str(e)) from None

    for name in made:
        print(f"{made[name]}  role {Identity.load(args.dir, name).role}")
    print(f"CA: {os.path.join(args.dir, 'ca.pem')} (its key ca.key signs more with the same command; keep it private)")
    if roster is not None:
        path = roster.write(os.path.join(args.dir, "roster.json"))
        counts = ", ".join(f"{len([n for n in roster.names(k) if not roster.entries[n].spare])} {k}"
                           for k in ("client", "attacker"))
        spares = sum(1 for e in roster.entries.values() if e.spare)
        print(f"roster: {path} ({counts}{f', {spares} spare' if spares else ''}; "
              f"{'unsharded' if args.unsharded else 'one shard each'}): the orchestrator's only (--roster, "
              "FEDSEQ_ROSTER, or roster.json in its --tls-dir); never give it to the server or a worker")
        unrostered = sorted(n for n, r in (names or {}).items() if r == "worker" and roster.entry(n) is None)
        if unrostered:
            print(f"not on the roster: {', '.join(unrostered)} (add each to roster.json with its kind)")
    elif any(r == "worker" for r in (names or DEFAULT_NAMES).values()):
        print("note: give every worker its own certificate (--clients N --attackers M, or --name NAME:worker) and "
              "the orchestrator a roster (roster.json) that says which identity is a client and which an attacker; "
              "under TLS the orchestrator does not start without one (deploy/README.md)", file=sys.stderr)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from fedseq.data import least_popular_item, load_dataset, stats

    ds = load_dataset(args.dataset, args.data_root)
    print(stats(ds).format())
    print(f"least popular training item (default target): {least_popular_item(ds)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedseq.report import report

    return report(args.run_dir, plot=not args.no_plot, out=args.out)


class _StrictParser(argparse.ArgumentParser):
    """A subcommand's parser that refuses abbreviated flags."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def _add_certs(sub) -> None:
    """``fedseq certs``."""
    p = sub.add_parser("certs", help="make a CA and mTLS certificates (one role each) for the services")
    p.add_argument("dir", help="folder for ca.pem/ca.key and NAME.pem/NAME.key (an existing CA is reused)")
    p.add_argument("--name", action="append", metavar="NAME[:ROLE]",
                   help="a certificate to make, e.g. client-0:worker (repeatable; default: server, orchestrator, "
                        "worker, operator, each its own role); roles: orchestrator, server, worker, operator")
    p.add_argument("--hosts", help="extra DNS names / IPs in every certificate, comma list (default localhost, "
                                   "127.0.0.1, ::1)")
    p.add_argument("--days", type=int, default=365)
    p.add_argument("--clients", type=int, metavar="N",
                   help="worker certificates client-0..N-1 (role worker, each its own), and DIR/roster.json naming "
                        "them clients; with it no shared `worker` certificate is made")
    p.add_argument("--attackers", type=int, metavar="M",
                   help="likewise attacker-0..M-1, rostered as attackers")
    p.add_argument("--spares", type=int, default=0, metavar="K",
                   help="spare-0..K-1: client identities that may take over the shard of a client that is gone "
                        "(needs sharded clients; default 0)")
    p.add_argument("--unsharded", action="store_true",
                   help="roster without shards: every identity of a kind may host all of its users (compose, "
                        "Kubernetes); default: shard i for client-i and attacker-i")
    p.set_defaults(fn=cmd_certs)


def parser() -> argparse.ArgumentParser:
    """The ``fedseq`` argument parser (defaults read ``FEDSEQ_*`` variables when it is built)."""
    from cli import services

    # no abbreviated flags: a flag a command lost (a worker's --port) must fail, not match --port-file
    ap = argparse.ArgumentParser(prog="fedseq", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--log-level", default=os.environ.get("FEDSEQ_LOG_LEVEL", "warning"))
    ap.add_argument("--log-format", default=os.environ.get("FEDSEQ_LOG_FORMAT", "text"),
                    help="text, or json: one object per line with service, run and round ids (FEDSEQ_LOG_FORMAT)")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_StrictParser)

    p = sub.add_parser("run", help="run a networked federation on this machine (the main job)")
    add_experiment_flags(p)
    p.add_argument("--workers", type=int, default=2, help="benign client worker processes (default 2)")
    p.add_argument("--attackers", type=int, default=1, help="attacker worker processes when --attack is set")
    p.add_argument("--redis-url", help="use this Redis instead of starting one (FEDSEQ_REDIS_URL; a URL with a "
                                       "password only through that variable: argv is public). Only the server and "
                                       "the orchestrator get it; workers then read models through the server's "
                                       "GetModel")
    p.add_argument("--round-timeout", type=float, default=600.0)
    p.add_argument("--out", help="results bundle folder (default runs/<run-id>)")
    p.add_argument("--log-dir", help="service logs (default <out>/logs)")
    p.add_argument("--insecure", action="store_true",
                   help="no mutual TLS and no Redis users (default: both on, certificates in <out>/tls)")
    add_track_flag(p)
    p.set_defaults(fn=cmd_run)

    _add_certs(sub)

    p = sub.add_parser("check", help="check a run's configuration: build its data, model, rule and attack, run nothing")
    add_experiment_flags(p)
    p.set_defaults(fn=cmd_check)

    p = sub.add_parser("sim", help="run the experiment in one process (no network)")
    add_experiment_flags(p)
    p.add_argument("--out", help="results folder")
    add_track_flag(p)
    p.set_defaults(fn=cmd_sim)

    p = sub.add_parser("data", help="print dataset statistics")
    p.add_argument("dataset", nargs="?", default="synthetic")
    p.add_argument("--data-root")
    p.set_defaults(fn=cmd_data)

    p = sub.add_parser("report", help="print runs' results and communication ledgers, plot bytes per round")
    p.add_argument("run_dir", nargs="+", help="run folder(s) (fedseq run --out), or a folder of run folders")
    p.add_argument("--out", help="plot file (PNG; default: bytes_per_round.png in the run folder, or in the "
                                 "runs' common parent folder)")
    p.add_argument("--no-plot", action="store_true")
    p.set_defaults(fn=cmd_report)

    from cli import reproduce, sweep

    p = sub.add_parser("sweep", help="attacks x defenses x malicious ratios x seeds, one run per cell; table and "
                                     "plots (`fedseq sweep mission` is the main job)")
    sweep.add_arguments(p)
    p.set_defaults(fn=sweep.main)

    p = sub.add_parser("reproduce", help="reproduce a table or figure of the DV-FSR paper (a predefined sweep) and write its page")
    reproduce.add_arguments(p)
    p.set_defaults(fn=reproduce.main)

    services.add_parsers(sub, add_experiment_flags)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        _setup_logging(args.log_level, args.log_format, args.cmd)
    except ConfigError as e:
        print(f"fedseq: configuration error: {e}", file=sys.stderr)
        return 2
    try:
        return int(args.fn(args) or 0)
    except ConfigError as e:
        print(f"fedseq: configuration error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError, RuntimeError) as e:  # data, store, TLS, Redis: one line, no traceback
        from fedseq.data import DataError
        from fedseq.redis_server import RedisServerError
        from fedseq.store import StoreError
        from fedseq.tls import TLSError

        if not isinstance(e, DataError | StoreError | TLSError | RedisServerError | OSError):
            raise
        if args.log_level.lower() == "debug":
            logging.getLogger("fedseq").exception("details")
        print(f"fedseq: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedseq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
