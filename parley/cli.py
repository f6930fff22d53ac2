"""The ``parley`` command line."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import httpx
import typer

from core.config import get_settings

app = typer.Typer(
    help="Parley: WhatsApp, Messenger and Instagram answered by self-hosted LLaMA models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bots_app = typer.Typer(help="Declare bots, Meta apps and channel accounts.", no_args_is_help=True)
app.add_typer(bots_app, name="bots")


def _logging() -> None:
    from core.logging import configure_logging

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)


@app.command()
def run() -> None:
    """Start everything: embedded Postgres/Redis/model when not configured, API, workers, beat."""
    from parley import runner

    _logging()
    raise typer.Exit(runner.run())


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="Bind address (default PARLEY_API_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default PARLEY_API_PORT)")] = None,
) -> None:
    """Serve the HTTP API (webhooks, health, docs)."""
    import uvicorn

    from core.celery_app import configure_celery
    from parley.app import create_app

    _logging()
    settings = get_settings()
    configure_celery(settings)
    # The event loop hands each webhook to the intake's writer thread and back: with Python's
    # default 5 ms GIL switch interval every hand-off can wait that long under load.
    sys.setswitchinterval(0.0005)
    uvicorn.run(
        create_app(settings),
        host=host or settings.api_host,
        port=port or settings.api_port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=20,
    )


@app.command()
def worker(
    queues: Annotated[
        str, typer.Option(help="Comma-separated lanes")
    ] = "conversations,send,maintenance",
    concurrency: Annotated[int, typer.Option(help="Processes or threads")] = 2,
    pool: Annotated[str | None, typer.Option(help="prefork | threads (default per lane)")] = None,
) -> None:
    """Run a Celery worker for the given lanes."""
    from parley import worker as wiring

    _logging()
    names = [q.strip() for q in queues.split(",") if q.strip()]
    wiring.install_readiness(get_settings().worker_health_port)
    celery = wiring.celery()
    celery.worker_main(
        [
            "worker",
            "--queues",
            ",".join(names),
            "--pool",
            pool or wiring.pool_for(names),
            "--concurrency",
            str(concurrency),
            "--loglevel",
            get_settings().log_level,
            "--without-gossip",
            "--without-mingle",
        ]
    )


@app.command()
def beat() -> None:
    """Run the scheduler (outbox relay and periodic maintenance)."""
    from parley import worker as wiring

    _logging()
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    celery = wiring.celery()
    celery.start(
        [
            "beat",
            "--loglevel",
            settings.log_level,
            "--schedule",
            str(settings.data_dir / "celerybeat-schedule"),
        ]
    )


@app.command()
def migrate() -> None:
    """Upgrade the database schema to the latest migration."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    from parley import migrate as migrations
    from parley.runtime import adopt_running_platform

    settings = adopt_running_platform()
    engine = create_engine(settings.require_database_url(), poolclass=NullPool)
    migrations.upgrade(engine)
    typer.echo(f"database at {migrations.current(engine)}")


@app.command()
def status() -> None:
    """Print the platform at a glance: traffic, outcomes, queues, accounts, model servers."""
    import json

    from core.db import make_sessionmaker, session_scope
    from dashboard.overview import overview
    from parley.runtime import adopt_running_platform

    settings = adopt_running_platform()
    with session_scope(make_sessionmaker()) as session:
        view = overview(session, settings)
    typer.echo(json.dumps(view.as_dict(), indent=2, sort_keys=True))


@bots_app.command("apply")
def bots_apply(
    file: Annotated[Path, typer.Option("-f", "--file", help="bots YAML file")],
) -> None:
    """Create or update what the file declares (idempotent; nothing is deleted)."""
    from bots.config import load_bots
    from bots.service import apply_bots
    from core.db import make_sessionmaker, session_scope
    from core.errors import ConfigError
    from parley.runtime import adopt_running_platform

    adopt_running_platform()
    try:
        spec = load_bots(file, os.environ)
        with session_scope(make_sessionmaker()) as session:
            report = apply_bots(session, spec)
    except ConfigError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from exc
    for label in report.created:
        typer.echo(f"created   {label}")
    for label in report.updated:
        typer.echo(f"updated   {label}")
    typer.echo(report.summary())


@app.command()
def chat(
    api_url: Annotated[str | None, typer.Option("--api", help="API base URL")] = None,
    channel: Annotated[str, typer.Option(help="whatsapp, messenger or instagram")] = "whatsapp",
    account: Annotated[
        str | None,
        typer.Option(help="The account to talk to: phone_number_id, page id or IG account id"),
    ] = None,
    wa_id: Annotated[
        str | None, typer.Option("--from", help="Your WhatsApp id, PSID or IGSID")
    ] = None,
    message: Annotated[
        list[str] | None, typer.Option("-m", "--message", help="Send, print the reply, exit")
    ] = None,
) -> None:
    """Chat with a bot from the terminal, the way WhatsApp, Messenger or Instagram would deliver
    your messages (signed webhooks). Besides text: /image PATH (on WhatsApp a made-up media id:
    the bytes are not uploaded anywhere), /react EMOJI (to the bot's last message), /delete (your
    last message; Messenger has no unsend), /stop, /help, /quit."""
    from parley.chat import CHANNEL_NAMES, CHANNELS, Chat, find_target, new_user_id, run_chat
    from parley.runtime import adopt_running_platform

    if channel not in CHANNELS:
        typer.echo(f"error: --channel must be one of {', '.join(CHANNELS)}", err=True)
        raise typer.Exit(2)
    settings = adopt_running_platform()
    api = api_url or f"http://{settings.api_host}:{settings.api_port}"
    try:
        target = find_target(account, channel)
        session = Chat(api, target, wa_id or new_user_id(channel))
    except (LookupError, RuntimeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    except httpx.HTTPError as exc:
        typer.echo(
            f"error: cannot reach the API at {api} ({exc}); is `make run` running?", err=True
        )
        raise typer.Exit(1) from exc
    me = session.user
    if message:
        run_chat(session, message, typer.echo)
        return
    typer.echo(
        f"chatting with {CHANNEL_NAMES[channel]} account {target.account} as {me};"
        " /help for commands, /quit to leave"
    )

    def lines() -> object:
        while True:
            try:
                yield input("you> ")
            except EOFError:
                return

    run_chat(session, lines(), typer.echo)  # type: ignore[arg-type]  # generator of str


@app.command("test")
def run_conversations(
    file: Annotated[Path, typer.Argument(help="conversations YAML file")],
    bots_file: Annotated[
        Path | None,
        typer.Option("--bots", help="bots YAML to test (default: the database's bots)"),
    ] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed (replies at temperature 0)")] = 42,
) -> None:
    """Run scripted conversations through the real intake, pipeline and model, and check each
    turn (outcome, reply regex, notices, moderation reasons, mode, opt-out). Nothing is kept in
    the database. Exit 0 when every turn passes, 1 when one fails, 2 for an invalid file, 3
    when the database or the model cannot be reached."""
    from core.logging import configure_logging
    from parley import scenarios

    settings = get_settings()
    # The turn lines are the output; the pipeline's INFO events would drown them.
    level = settings.log_level if "log_level" in settings.model_fields_set else "WARNING"
    configure_logging(level, settings.log_format)
    code = scenarios.main(
        file,
        bots_path=bots_file,
        seed=seed,
        out=typer.echo,
        err=lambda line: typer.echo(line, err=True),
        environ=os.environ,
    )
    raise typer.Exit(code)


def main() -> None:
    app(prog_name="parley")


if __name__ == "__main__":
    main()
    sys.exit(0)
