"""The ``rtcbus`` command: wires the settings to the parts, and has no logic of its own.

Options that every command shares come before the command
(``rtcbus --bootstrap-servers host:9092 topics create``); each is also an ``RTCBUS_*``
environment variable, and a flag overrides the environment. An error rtcbus raises on
purpose is one line on stderr and exit status 1, never a traceback.

To add a command: write its function (it takes ``ctx`` and calls :func:`_settings`), then
name it in the command tree at the bottom of this file.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from confluent_kafka import KafkaException

from consumer.errors import RtcbusError
from consumer.kafka import admin
from consumer.kafka.launcher import LocalKafka
from consumer.settings import Settings, load_settings


class _Rtcbus(typer.Typer):
    """Typer, reporting rtcbus's errors as one line on stderr with exit status 1."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except RtcbusError as exc:
            typer.echo(f"rtcbus: error: {exc}", err=True)
            raise SystemExit(1) from None
        except KafkaException as exc:
            typer.echo(f"rtcbus: Kafka error: {exc.args[0].str()}", err=True)
            raise SystemExit(1) from None


def _settings(ctx: typer.Context, **flags: object) -> Settings:
    """The settings: the environment, overridden by the shared flags, then the command's own."""
    return load_settings(**ctx.obj, **flags)


# -- shared options ------------------------------------------------------------------------


def main(
    ctx: typer.Context,
    bootstrap_servers: Annotated[
        str | None,
        typer.Option(help="Kafka bootstrap servers (env RTCBUS_BOOTSTRAP_SERVERS); default: the local Kafka."),
    ] = None,
    home: Annotated[
        Path | None,
        typer.Option(help="Where the local Kafka keeps jars, data and logs (env RTCBUS_HOME); default ~/.rtcbus."),
    ] = None,
    topic_prefix: Annotated[
        str | None, typer.Option(help="Prefix of every topic name (env RTCBUS_TOPIC_PREFIX); default rtc.")
    ] = None,
) -> None:
    """RTC callbacks as a typed, exactly-once event bus on Apache Kafka."""
    ctx.obj = {"bootstrap_servers": bootstrap_servers, "home": home, "topic_prefix": topic_prefix}
    # The parts report progress (fetching Kafka, starting nodes) through logging.
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)


# -- rtcbus kafka ----------------------------------------------------------------------------


def kafka_start(
    ctx: typer.Context,
    brokers: Annotated[
        int | None,
        typer.Option(help="Nodes in the local cluster (env RTCBUS_BROKERS); default 1, or as it last ran."),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(help="First port (env RTCBUS_LOCAL_PORT); node i uses port+2(i-1) and the next one."),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the brokers to answer.")] = 60.0,
) -> None:
    """Start the local Apache Kafka (KRaft) on 127.0.0.1; print its bootstrap servers."""
    kafka = LocalKafka(_settings(ctx, brokers=brokers, local_port=port))
    started = time.monotonic()
    bootstrap = kafka.start(timeout_s=timeout)
    typer.echo(
        f"Kafka {kafka.kafka_version} is up, {len(kafka.nodes)} broker(s) "
        f"({time.monotonic() - started:.1f} s); data in {kafka.cluster_dir}",
        err=True,
    )
    typer.echo(bootstrap)


def kafka_stop(
    ctx: typer.Context,
    timeout: Annotated[float, typer.Option(help="Seconds a broker gets to shut down before it is killed.")] = 30.0,
) -> None:
    """Stop the local Kafka (controlled shutdown); its data stays for the next start."""
    stopped = LocalKafka(_settings(ctx)).stop(timeout_s=timeout)
    if stopped:
        typer.echo(f"Stopped Kafka node(s) {', '.join(str(node.node_id) for node in stopped)}.")
    else:
        typer.echo("The local Kafka is not running.")


def kafka_status(ctx: typer.Context) -> None:
    """Show what of the local Kafka runs where: pids, ports, data and logs."""
    kafka = LocalKafka(_settings(ctx))
    statuses = kafka.status()
    if not statuses:
        typer.echo(f"No local Kafka in {kafka.cluster_dir} yet; `rtcbus kafka start` creates it.")
        return
    typer.echo(f"Kafka {kafka.kafka_version} in {kafka.cluster_dir}")
    for status in statuses:
        node = status.node
        state = f"running (pid {status.pid})" if status.pid is not None else "stopped"
        typer.echo(
            f"  node {node.node_id}: {state:<20} {node.address}  controller port {node.controller_port}\n"
            f"          data {node.data_dir}\n"
            f"          log  {node.log_file}"
        )
    typer.echo(f"bootstrap servers: {kafka.bootstrap_servers}")


# -- rtcbus registry -------------------------------------------------------------------------


def registry_start(
    ctx: typer.Context,
    port: Annotated[int | None, typer.Option(help="Port on 127.0.0.1 (env RTCBUS_REGISTRY_PORT); default 8081.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for /health/ready.")] = 60.0,
) -> None:
    """Start the local Schema Registry (Apicurio, in-memory) on 127.0.0.1; print its client URL."""
    from consumer.registry import LocalRegistry

    logging.getLogger("httpx").setLevel(logging.WARNING)  # the readiness polls
    settings = _settings(ctx, registry_port=port)
    registry = LocalRegistry(settings)
    started = time.monotonic()
    url = registry.start(timeout_s=timeout)
    typer.echo(
        f"Apicurio Registry {settings.registry_version} is up ({time.monotonic() - started:.1f} s); "
        f"log {registry.log_file}",
        err=True,
    )
    typer.echo(url)


def registry_stop(
    ctx: typer.Context,
    timeout: Annotated[float, typer.Option(help="Seconds it gets to shut down before it is killed.")] = 30.0,
) -> None:
    """Stop the local Schema Registry; its schemas (in memory) are gone with it."""
    from consumer.registry import LocalRegistry

    if LocalRegistry(_settings(ctx)).stop(timeout_s=timeout):
        typer.echo("Stopped the local Schema Registry.")
    else:
        typer.echo("The local Schema Registry is not running.")


def registry_status(ctx: typer.Context) -> None:
    """Show whether the local Schema Registry runs, where, and its log."""
    from consumer.registry import LocalRegistry

    status = LocalRegistry(_settings(ctx)).status()
    state = f"running (pid {status.pid})" if status.pid is not None else "not running"
    typer.echo(f"Schema Registry: {state}  {status.url}\n  log {status.log_file}")


# -- rtcbus topics ---------------------------------------------------------------------------


def topics_create(
    ctx: typer.Context,
    partitions: Annotated[int | None, typer.Option(help="Partitions per topic (env RTCBUS_PARTITIONS).")] = None,
    replication_factor: Annotated[
        int | None,
        typer.Option(help="(env RTCBUS_REPLICATION_FACTOR); default 3 on 3+ brokers, else 1."),
    ] = None,
) -> None:
    """Create rtcbus's topics that do not exist yet: raw, one per domain, DLQ, quarantine, dedupe."""
    settings = _settings(ctx, partitions=partitions, replication_factor=replication_factor)
    created = admin.ensure_topics(settings)
    for name in admin.topic_names(settings):
        typer.echo(f"{'created' if name in created else 'exists '}  {name}")


def topics_list(ctx: typer.Context) -> None:
    """Show rtcbus's topics with their partitions, replication and own settings."""
    settings = _settings(ctx)
    topics = admin.describe_topics(settings, admin.topic_names(settings))
    width = max(len(name) for name in topics)
    for name, info in topics.items():
        if info is None:
            typer.echo(f"{name:<{width}}  missing")
            continue
        config = " ".join(f"{key}={value}" for key, value in info.config.items())
        typer.echo(
            f"{name:<{width}}  partitions={info.partitions}  replication={info.replication_factor}  {config}"
        )


# -- rtcbus schemas --------------------------------------------------------------------------


def schemas_list(ctx: typer.Context) -> None:
    """Show every EventType: its domain, topic, key field and schema fingerprint."""
    from consumer.envelope import KEY_FALLBACK, KEY_FIELDS
    from consumer.routing import RoutingTable
    from consumer.schemas import contract

    table = RoutingTable.from_settings(_settings(ctx))
    schemas = contract()
    rows = []
    for event_type in table.event_types:
        route = table.route(event_type)
        fields = schemas[event_type].data_fields
        key = next((field for field in KEY_FIELDS if field in fields), KEY_FALLBACK[0])
        rows.append((event_type, route.domain, route.topic, key, schemas[event_type].fingerprint.hex()))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    typer.echo("  ".join(f"{h:<{w}}" for h, w in zip(("EventType", "domain", "topic", "key"), widths)) + "  fingerprint")
    for row in rows:
        typer.echo("  ".join(f"{v:<{w}}" for v, w in zip(row, widths)) + f"  {row[4]}")
    typer.echo(f"{len(rows)} EventTypes in {len({row[1] for row in rows})} domains")


def _compatibility_level(value: str) -> str:
    from consumer.compatibility import LEVELS

    if value.upper() not in LEVELS:
        raise typer.BadParameter(f"{value}: one of {', '.join(LEVELS)}")
    return value.upper()


_CONTRACT_HELP = "A folder of .avsc files instead of the contract (avro/), e.g. a released one."


def schemas_register(
    ctx: typer.Context,
    schema_registry_url: Annotated[str | None, typer.Option(help="(env RTCBUS_SCHEMA_REGISTRY_URL)")] = None,
    compatibility: Annotated[
        str | None,
        typer.Option(help="Also set each subject's compatibility level, e.g. BACKWARD; default: leave it."),
    ] = None,
    contract_dir: Annotated[Path | None, typer.Option("--contract", exists=True, file_okay=False, help=_CONTRACT_HELP)] = None,
) -> None:
    """Register every EventType's schema under the subject the routers write it with."""
    from consumer import compatibility as compat
    from consumer.schemas import SchemaSet, contract

    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per registry request
    level = None if compatibility is None else _compatibility_level(compatibility)
    settings = _settings(ctx, schema_registry_url=schema_registry_url)
    found = compat.subjects(settings, SchemaSet.load(contract_dir) if contract_dir else contract())
    ids = compat.register(compat.registry_client(settings), found, level)
    width = max(len(subject.name) for subject in found)
    for subject in found:
        typer.echo(f"{subject.name:<{width}}  id {ids[subject.name]}")
    typer.echo(f"{len(found)} subjects registered" + (f", compatibility {level}" if level else ""))


def schemas_check(
    ctx: typer.Context,
    schema_registry_url: Annotated[str | None, typer.Option(help="(env RTCBUS_SCHEMA_REGISTRY_URL)")] = None,
    compatibility: Annotated[
        str,
        typer.Option(
            help="The level each schema must meet against the registered one; a subject at "
            "another level is set to it first (the registry judges by the subject's own)."
        ),
    ] = "BACKWARD",
    contract_dir: Annotated[Path | None, typer.Option("--contract", exists=True, file_okay=False, help=_CONTRACT_HELP)] = None,
) -> None:
    """For each EventType: may its schema follow what the registry holds? Exit 1 if any may not.

    The verdict is the registry's; the fields named for an incompatible schema are found by
    comparing the two schemas here, since the registry names none.
    """
    from consumer import compatibility as compat
    from consumer.schemas import SchemaSet, contract

    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per registry request
    level = _compatibility_level(compatibility)
    settings = _settings(ctx, schema_registry_url=schema_registry_url)
    found = compat.subjects(settings, SchemaSet.load(contract_dir) if contract_dir else contract())
    verdicts = compat.check(compat.registry_client(settings), found, level)
    widths = (max(len(v.subject.event_type) for v in verdicts), max(len(v.subject.name) for v in verdicts))
    typer.echo(f"{'EventType':<{widths[0]}}  {'subject':<{widths[1]}}  verdict")
    for verdict in verdicts:
        why = "; ".join(verdict.fields) if verdict.fields else (
            "no field found by comparison; see the registry" if verdict.state == "incompatible" else ""
        )
        typer.echo(
            f"{verdict.subject.event_type:<{widths[0]}}  {verdict.subject.name:<{widths[1]}}  "
            f"{verdict.state}{'  ' + why if why else ''}"
        )
    counts = {state: sum(v.state == state for v in verdicts) for state in ("compatible", "incompatible", "new")}
    typer.echo(", ".join(f"{n} {state}" for state, n in counts.items() if n) + f" ({level})")
    changed = [v for v in verdicts if v.level_was is not None]
    if changed:
        was = ", ".join(sorted({v.level_was or "" for v in changed}))
        typer.echo(f"set the compatibility level of {len(changed)} subjects to {level} (was {was})")
    if counts["incompatible"]:
        raise typer.Exit(1)


# -- rtcbus asyncapi ---------------------------------------------------------------------------


def asyncapi(
    ctx: typer.Context,
    output_format: Annotated[str, typer.Option("--format", help="yaml or json.")] = "yaml",
) -> None:
    """Print the topics, records, keys and headers as an AsyncAPI 3.0 document."""
    import json

    import yaml

    from consumer.asyncapi import to_asyncapi
    from consumer.kafka.config import bootstrap_servers

    if output_format not in ("yaml", "json"):
        raise typer.BadParameter(f"{output_format!r} is neither yaml nor json", param_hint="--format")
    settings = _settings(ctx)
    settings = settings.model_copy(update={"bootstrap_servers": bootstrap_servers(settings)})
    document = to_asyncapi(settings)
    if output_format == "json":
        typer.echo(json.dumps(document, indent=2, ensure_ascii=False))
    else:
        typer.echo(yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=100), nl=False)


# -- rtcbus router / tail / up -----------------------------------------------------------------


def router(
    ctx: typer.Context,
    instance_id: Annotated[str | None, typer.Option(help="Fixes the transactional.id to <group>-<id>; default: unique per process (env RTCBUS_INSTANCE_ID).")] = None,
    commit_interval_ms: Annotated[int | None, typer.Option(help="Commit at least this often (env RTCBUS_COMMIT_INTERVAL_MS).")] = None,
    dedupe_window_s: Annotated[float | None, typer.Option(help="Remember EventIds this long (env RTCBUS_DEDUPE_WINDOW_S).")] = None,
    metrics_host: Annotated[str | None, typer.Option(help="Address of /metrics, /healthz and /readyz (env RTCBUS_METRICS_HOST); default 127.0.0.1.")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Port of /metrics, /healthz and /readyz (env RTCBUS_METRICS_PORT); 0: none.")] = None,
    exactly_once: Annotated[
        bool | None,
        typer.Option(
            "--exactly-once/--at-least-once",
            help="Transactions (default), or flush-then-commit, which a crash can duplicate (env RTCBUS_EXACTLY_ONCE).",
        ),
    ] = None,
    processes: Annotated[
        int | None,
        typer.Option(
            min=1, max=64,
            help="Group members to run, one process each, for one core each (env RTCBUS_ROUTER_PROCESSES); "
            "member i serves its probes on metrics port + i.",
        ),
    ] = None,
) -> None:
    """Route raw callbacks to the domain topics, exactly once, until SIGTERM or Ctrl-C."""
    from consumer.router import run_router
    from consumer.router.processes import run_processes

    settings = _settings(
        ctx,
        instance_id=instance_id,
        commit_interval_ms=commit_interval_ms,
        dedupe_window_s=dedupe_window_s,
        metrics_host=metrics_host,
        metrics_port=metrics_port,
        exactly_once=exactly_once,
        router_processes=processes,
    )
    if settings.router_processes == 1:
        run_router(settings)
    else:
        raise typer.Exit(run_processes(settings, settings.router_processes))


def tail(
    ctx: typer.Context,
    domains: Annotated[list[str] | None, typer.Argument(help="Domains to read, e.g. room recording.")] = None,
    all_domains: Annotated[bool, typer.Option("--all", help="Every domain, unknown included.")] = False,
    idle_timeout: Annotated[float | None, typer.Option(help="Exit after this many seconds without a record.")] = None,
    limit: Annotated[int | None, typer.Option(help="Exit after this many records.")] = None,
) -> None:
    """Print committed records of domain topics as JSON lines, from the beginning."""
    import threading

    from consumer import tail as tailing

    if not domains and not all_domains:
        raise typer.BadParameter("name one or more domains, or --all")
    stop = threading.Event()
    try:
        tailing.tail(_settings(ctx), [] if all_domains else domains, typer.echo, stop, idle_timeout, limit)
    except KeyError as exc:
        raise typer.BadParameter(exc.args[0]) from None
    except KeyboardInterrupt:
        stop.set()


def up(
    ctx: typer.Context,
    secrets: Annotated[str | None, typer.Option(help="Callback secrets, comma-separated (env RTCBUS_SECRETS); generated if none.")] = None,
    shim_host: Annotated[str | None, typer.Option(help="(env RTCBUS_SHIM_HOST)")] = None,
    shim_port: Annotated[int | None, typer.Option(help="(env RTCBUS_SHIM_PORT)")] = None,
    commit_interval_ms: Annotated[int | None, typer.Option(help="(env RTCBUS_COMMIT_INTERVAL_MS)")] = None,
    dedupe_window_s: Annotated[float | None, typer.Option(help="(env RTCBUS_DEDUPE_WINDOW_S)")] = None,
    registry: Annotated[
        bool,
        typer.Option("--registry", help="Also the local Schema Registry; shim and router write the Confluent wire format to it."),
    ] = False,
) -> None:
    """Run everything: local Kafka (unless bootstrap servers are given), topics, shim, router."""
    from consumer.stack import up as bring_up

    settings = _settings(
        ctx,
        secrets=secrets,
        shim_host=shim_host,
        shim_port=shim_port,
        commit_interval_ms=commit_interval_ms,
        dedupe_window_s=dedupe_window_s,
    )
    raise typer.Exit(bring_up(settings, typer.echo, registry=registry))


# -- rtcbus shim / send ---------------------------------------------------------------------


def shim(
    ctx: typer.Context,
    host: Annotated[
        str | None,
        typer.Option("--host", "--shim-host", help="Address to listen on (env RTCBUS_SHIM_HOST); default 127.0.0.1."),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option("--port", "--shim-port", help="Port to listen on (env RTCBUS_SHIM_PORT); default 8080."),
    ] = None,
    admin_port: Annotated[
        int | None,
        typer.Option(help="Port of /metrics and /openapi.json (env RTCBUS_SHIM_ADMIN_PORT); default 9109."),
    ] = None,
    secrets: Annotated[
        str | None,
        typer.Option(
            help="Callback secrets, comma-separated, any of them accepted (env RTCBUS_SECRETS); "
            "required unless --unsigned or RTCBUS_APP_SECRETS."
        ),
    ] = None,
    unsigned: Annotated[
        bool | None,
        typer.Option(
            "--unsigned",
            help="Check no signatures: anyone who reaches the shim can write callbacks "
            "(env RTCBUS_UNSIGNED); not with secrets.",
        ),
    ] = None,
    spool_dir: Annotated[
        Path | None,
        typer.Option(help="The spool's directory (env RTCBUS_SPOOL_DIR); default <home>/spool."),
    ] = None,
    spool: Annotated[
        bool | None,
        typer.Option(
            "--spool/--no-spool",
            help="Spool callbacks Kafka cannot take in time, or answer 503 (env RTCBUS_SPOOL); default on.",
        ),
    ] = None,
    max_body_bytes: Annotated[int | None, typer.Option(help="Larger bodies get 413 (env RTCBUS_MAX_BODY_BYTES).")] = None,
    ack_timeout_s: Annotated[
        float | None, typer.Option(help="Answer 503 when Kafka has not acknowledged by then (env RTCBUS_ACK_TIMEOUT_S).")
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Shim processes sharing the port, one core each; worker i has its own producer, "
            "spool (<spool-dir>/worker-i) and admin port (admin-port + i).",
        ),
    ] = 1,
) -> None:
    """Receive callbacks over HTTP and write them to the raw topic, until SIGTERM or Ctrl-C."""
    from consumer.shim import run_shim
    from consumer.shim_workers import adopt_orphaned_spools, run_workers

    settings = _settings(
        ctx,
        shim_host=host,
        shim_port=port,
        shim_admin_port=admin_port,
        secrets=secrets,
        unsigned=unsigned,
        spool_dir=spool_dir,
        spool=spool,
        max_body_bytes=max_body_bytes,
        ack_timeout_s=ack_timeout_s,
    )
    if workers > 1:
        raise typer.Exit(run_workers(settings, workers))
    adopt_orphaned_spools(settings, 1)  # what workers of an earlier run left
    run_shim(settings)


def send(
    ctx: typer.Context,
    examples: Annotated[bool, typer.Option("--examples", help="Each of the events page's 45 examples once.")] = False,
    rate: Annotated[float | None, typer.Option(help="Generated load: callbacks per second.")] = None,
    duration: Annotated[float, typer.Option(help="Generated load: seconds to send for.")] = 10.0,
    url: Annotated[str | None, typer.Option(help="The shim's callback URL; default from --shim-host/--shim-port.")] = None,
    shim_host: Annotated[str | None, typer.Option(help="(env RTCBUS_SHIM_HOST)")] = None,
    shim_port: Annotated[int | None, typer.Option(help="(env RTCBUS_SHIM_PORT)")] = None,
    secrets: Annotated[
        str | None, typer.Option(help="Sign with the first of these (env RTCBUS_SECRETS); none: unsigned.")
    ] = None,
    app_id: Annotated[str, typer.Option(help="AppId of the callbacks.")] = "rtcbus-demo",
    concurrency: Annotated[int, typer.Option(min=1, help="Callbacks in flight at most.")] = 16,
    rooms: Annotated[int, typer.Option(min=1, help="Generated load: distinct RoomIds.")] = 50,
) -> None:
    """Sign callbacks like the RTC service and POST them to a shim (3 tries each, like the vendor)."""
    from consumer import sender
    from consumer.examples import load_examples

    if examples == (rate is not None):
        raise typer.BadParameter("give either --examples or --rate N [--duration S]")
    settings = _settings(ctx, shim_host=shim_host, shim_port=shim_port, secrets=secrets)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per POST would bury the bar
    target = url or f"http://{settings.shim_host}:{settings.shim_port}/callbacks"
    secret = sender.signing_secret(settings, app_id)
    if examples:
        callbacks = sender.example_callbacks(load_examples(), app_id=app_id, secret=secret)
        report = sender.send_with_progress(
            target, callbacks, len(callbacks), concurrency=concurrency, description="examples"
        )
    else:
        assert rate is not None
        total = max(1, round(rate * duration))
        generated = sender.load_callbacks(load_examples(), total, rooms=rooms, app_id=app_id, secret=secret)
        report = sender.send_with_progress(
            target, generated, total, concurrency=concurrency, rate=rate, description="load"
        )
    typer.echo(sender.describe_report(report))
    if report.failed:
        raise typer.Exit(1)


# -- rtcbus audit ----------------------------------------------------------------------------


def _time_range(since: str | None, until: str | None) -> Any:
    """``--since``/``--until`` (RFC 3339 or epoch ms, each optional) as a TimeRange."""
    from consumer.audit import TimeRange, parse_time

    try:
        return TimeRange(
            since_ms=None if since is None else parse_time(since),
            until_ms=None if until is None else parse_time(until),
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None



def audit(
    ctx: typer.Context,
    since: Annotated[str | None, typer.Option(help="First raw timestamp to audit: RFC 3339 or epoch ms; default: the beginning.")] = None,
    until: Annotated[str | None, typer.Option(help="Last raw timestamp to audit: RFC 3339 or epoch ms; default: the end.")] = None,
    expect: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="EventIds a sender was answered 200 for, one per line."),
    ] = None,
    group: Annotated[str | None, typer.Option(help="The router's consumer group (env RTCBUS_GROUP_ID).")] = None,
    settle_timeout: Annotated[float, typer.Option(min=0, help="Seconds to wait for open transactions to end.")] = 60.0,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object instead of the table.")] = False,
) -> None:
    """Compare raw with every output: lost, duplicated, out of order. Exit 1 on any, 2 if it cannot tell."""
    from consumer import audit as auditing

    window = _time_range(since, until)
    expected = auditing.read_expected(expect) if expect else None
    # Exit status 1 means findings here, so a failure to audit at all is 2, said as elsewhere.
    try:
        settings = _settings(ctx, group_id=group)
        with auditing.progress_bar() as on_progress:
            observed = auditing.read_pipeline(
                settings, window, group_id=settings.group_id, settle_timeout_s=settle_timeout,
                on_progress=on_progress,
            )
    except RtcbusError as exc:
        typer.echo(f"rtcbus: error: {exc}", err=True)
        raise typer.Exit(2) from None
    except KafkaException as exc:
        typer.echo(f"rtcbus: Kafka error: {exc.args[0].str()}", err=True)
        raise typer.Exit(2) from None
    report = auditing.compare(observed, expected)
    if json_output:
        typer.echo(auditing.to_json(report))
    else:
        auditing.print_report(report)
    raise typer.Exit(report.exit_code)


# -- rtcbus replay ---------------------------------------------------------------------------


def replay(
    ctx: typer.Context,
    since: Annotated[str, typer.Option("--from", help="First raw timestamp to replay: RFC 3339 or epoch ms.")],
    until: Annotated[str, typer.Option("--until", help="Last raw timestamp to replay, inclusive: RFC 3339 or epoch ms.")],
    to_prefix: Annotated[str, typer.Option(help="The topic prefix to write to; its topics are created if need be.")],
    types: Annotated[str | None, typer.Option(help="Only these EventTypes, comma-separated; the others are skipped.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=100_000, help="Raw records per transaction.")] = 500,
) -> None:
    """Re-derive the domain records of a time range of raw into another topic prefix, exactly once.

    Interrupted, run it again with the same arguments: it resumes where it stopped.
    """
    from consumer import audit as auditing
    from consumer import replay as replaying

    try:
        since_ms, until_ms = auditing.parse_time(since), auditing.parse_time(until)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if until_ms < since_ms:
        raise typer.BadParameter("--until is before --from", param_hint="--until")
    event_types = None if types is None else [name.strip() for name in types.split(",") if name.strip()]
    settings = _settings(ctx)
    with auditing.progress_bar() as on_progress:
        summary = replaying.replay(
            settings, since_ms, until_ms, to_prefix=to_prefix, event_types=event_types, on_progress=on_progress,
            batch_size=batch_size,
        )
    typer.echo(summary.describe())


# -- rtcbus find ------------------------------------------------------------------------------


def find(
    ctx: typer.Context,
    event_id: Annotated[str | None, typer.Option(help="The EventId to trace.")] = None,
    room: Annotated[str | None, typer.Option(help="Trace every event of this RoomId (the raw record's key).")] = None,
    since: Annotated[
        str | None, typer.Option(help="First raw timestamp to look at: RFC 3339 or epoch ms; default: raw's retention ago.")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Last raw timestamp to look at: RFC 3339 or epoch ms; default: now.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Events shown at most (with --room).")] = 20,
    settle_timeout: Annotated[float, typer.Option(min=0, help="Seconds to wait for open transactions to end.")] = 15.0,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object instead of lines.")] = False,
) -> None:
    """An event's whole lineage: its raw records, what the router made of each, any quarantine record.

    Exit 0 when something was found, 1 when nothing was, 2 if it cannot tell.
    """
    from consumer import audit as auditing
    from consumer import find as finding

    if (event_id is None) == (room is None):
        raise typer.BadParameter("give --event-id or --room, one of them")
    window = _time_range(since, until)
    # Exit status 1 means "not found" here, so a failure to look at all is 2, as for audit.
    try:
        settings = _settings(ctx)
        query = finding.Query(event_id=event_id, room=room, window=finding.window(settings, window.since_ms, window.until_ms))
        with auditing.progress_bar() as on_progress:
            report = finding.find(settings, query, limit=limit, settle_timeout_s=settle_timeout, on_progress=on_progress)
    except RtcbusError as exc:
        typer.echo(f"rtcbus: error: {exc}", err=True)
        raise typer.Exit(2) from None
    except KafkaException as exc:
        typer.echo(f"rtcbus: Kafka error: {exc.args[0].str()}", err=True)
        raise typer.Exit(2) from None
    typer.echo(finding.to_json(report) if json_output else finding.to_text(report))
    raise typer.Exit(report.exit_code)


# -- rtcbus dlq -------------------------------------------------------------------------------


def dlq_list(
    ctx: typer.Context,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object instead of the table.")] = False,
) -> None:
    """Count the dead letters by error class and field; their time range and an example of each kind."""
    from consumer import dlq

    listing = dlq.list_dlq(_settings(ctx))
    typer.echo(dlq.to_json(listing) if json_output else listing.describe())


def dlq_redrive(
    ctx: typer.Context,
    error: Annotated[
        list[str] | None,
        typer.Option("--error", help="Only dead letters of this error class (rtcbus.error.class); repeat for more."),
    ] = None,
    since: Annotated[str | None, typer.Option(help="Only dead letters written at or after: RFC 3339 or epoch ms.")] = None,
    until: Annotated[str | None, typer.Option(help="Only dead letters written at or before: RFC 3339 or epoch ms.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Transform and report; write and commit nothing.")] = False,
) -> None:
    """Run dead letters through the current transform into their domain topics, exactly once.

    Records that still fail are reported, not dead-lettered again; a later redrive finds them.
    """
    from consumer import audit as auditing
    from consumer import dlq
    from consumer.router.transform import Transform

    window = _time_range(since, until)
    settings = _settings(ctx)
    with auditing.progress_bar() as on_progress:
        summary = dlq.redrive(
            settings, Transform.from_settings(settings), error_classes=error or (), window=window,
            dry_run=dry_run, on_progress=on_progress,
        )
    typer.echo(summary.describe())


# -- rtcbus quarantine -----------------------------------------------------------------------


def quarantine_redrive(
    ctx: typer.Context,
    secrets: Annotated[
        str | None,
        typer.Option(help="The callback secrets that are right now, comma-separated (env RTCBUS_SECRETS)."),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check and report; write and commit nothing.")] = False,
) -> None:
    """Forward quarantined callbacks that pass the signature check now to raw, exactly once.

    Run it after fixing a secret. Records that still fail are listed and passed over.

    Exit status 0 once every record that passes is forwarded, 1 when Kafka or the settings fail.
    """
    from consumer import quarantine

    summary = quarantine.redrive(_settings(ctx, secrets=secrets), dry_run=dry_run, report=typer.echo)
    typer.echo(summary.describe())


def quarantine_list(ctx: typer.Context) -> None:
    """Count the quarantined callbacks by reason and AppId, and those not redriven yet."""
    from consumer import quarantine

    typer.echo(quarantine.list_quarantine(_settings(ctx)).describe())


# -- the command tree ------------------------------------------------------------------------

app = _Rtcbus(no_args_is_help=True, add_completion=False)
app.callback()(main)

kafka_app = typer.Typer(no_args_is_help=True, help="The local Apache Kafka, for development and tests.")
kafka_app.command("start")(kafka_start)
kafka_app.command("stop")(kafka_stop)
kafka_app.command("status")(kafka_status)
app.add_typer(kafka_app, name="kafka")

registry_app = typer.Typer(no_args_is_help=True, help="The local Schema Registry (Apicurio), for development and tests.")
registry_app.command("start")(registry_start)
registry_app.command("stop")(registry_stop)
registry_app.command("status")(registry_status)
app.add_typer(registry_app, name="registry")

topics_app = typer.Typer(no_args_is_help=True, help="rtcbus's Kafka topics.")
topics_app.command("create")(topics_create)
topics_app.command("list")(topics_list)
app.add_typer(topics_app, name="topics")

schemas_app = typer.Typer(no_args_is_help=True, help="The Avro contract.")
schemas_app.command("list")(schemas_list)
schemas_app.command("register")(schemas_register)
schemas_app.command("check")(schemas_check)
app.add_typer(schemas_app, name="schemas")

app.command("router")(router)
app.command("tail")(tail)
app.command("up")(up)
app.command("shim")(shim)
app.command("send")(send)
app.command("audit")(audit)
app.command("replay")(replay)
app.command("asyncapi")(asyncapi)
app.command("find")(find)

dlq_app = typer.Typer(no_args_is_help=True, help="Records the router could not process, kept for a redrive.")
dlq_app.command("list")(dlq_list)
dlq_app.command("redrive")(dlq_redrive)
app.add_typer(dlq_app, name="dlq")

quarantine_app = typer.Typer(no_args_is_help=True, help="Callbacks refused for their signature, kept for a redrive.")
quarantine_app.command("redrive")(quarantine_redrive)
quarantine_app.command("list")(quarantine_list)
app.add_typer(quarantine_app, name="quarantine")

if __name__ == "__main__":
    app()
