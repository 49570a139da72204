"""The `modelyard` command line (typer + rich).

User errors print one message naming the file, key or value and exit 2; ``--debug`` shows the
traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from modelyard.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Multi-model batch LLM pipelines on Prefect and vLLM, with per-row lineage.")
# Not a terminal (a pipe, a log, CI): wide enough that tables are not cut to 80 columns.
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
out = Console(width=None if sys.stdout.isatty() else 200)
STATE = {"debug": False}


def prefect_defaults() -> None:
    """Settings this kind of machine needs before Prefect is imported (see ENV.md)."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    from modelyard import prefect_logging

    prefect_logging.install()  # no cancellation tracebacks from the temporary API server's shutdown


@app.callback()
def main_options(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False) -> None:
    STATE["debug"] = debug
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("modelyard").setLevel(logging.INFO)


class _NoUserTracebacks(logging.Filter):
    """Prefect logs a failed task's traceback; for a user's mistake the message is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, UserError) and not STATE["debug"]:
            record.exc_info, record.exc_text = None, None
        return True


def quiet_user_tracebacks() -> None:
    for h in logging.getLogger().handlers:
        if not any(isinstance(f, _NoUserTracebacks) for f in h.filters):
            h.addFilter(_NoUserTracebacks())


def _fail(e: BaseException, code: int = 2) -> None:
    if STATE["debug"]:
        raise e
    err.print(f"[bold red]error:[/] {e}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@app.command()
def run(
    config: Annotated[str, typer.Argument(help="Pipeline YAML.")],
    param: Annotated[list[str], typer.Option("--param", "-p", help="KEY=VALUE for {KEY} placeholders.")] = [],  # noqa: B006
    limit: Annotated[Optional[int], typer.Option(help="Process only the first N input rows.")] = None,
    output: Annotated[Optional[str], typer.Option(help="Write here instead of output.uri.")] = None,
    retry_errors: Annotated[bool, typer.Option(
        "--retry-errors", help="Re-send only the requests that failed in the last output; the rest comes from "
        "the request cache.")] = False,
    retry_truncated: Annotated[bool, typer.Option(
        "--retry-truncated", help="Like --retry-errors, and also re-send requests that stopped at max_tokens.")] = False,
    runner: Annotated[Optional[str], typer.Option(help="local, ray or dask (default: the config's runner.kind).")] = None,
    gpus: Annotated[Optional[int], typer.Option(help="GPUs to plan managed servers on (default: detected).")] = None,
    gpu_memory: Annotated[Optional[float], typer.Option(
        "--gpu-memory", help="Memory of each GPU in GiB, to plan for a machine other than this one (with --gpus).")] = None,
) -> None:
    """Run the pipeline once and commit its output."""
    from modelyard import lifecycle, pipeline
    from modelyard.config import parse_params
    from modelyard.progress import TRACKER, Display
    from modelyard.serving import REGISTRY, STOPPING

    lifecycle.install()  # from here on SIGTERM stops the run within seconds, whatever it is doing
    prefect_defaults()
    try:
        params = parse_params(param)
        loaded = pipeline.load(config, params, output)
        pipeline.prepare(loaded, limit)  # every user error before Prefect starts
        from modelyard.planner import plan_for

        if any(m.managed for m in loaded.config.models.values()):
            err.print(plan_for(loaded.config, gpus, gpu_memory, loaded.base_dir).describe(), highlight=False,
                      soft_wrap=True)
        if retry_errors or retry_truncated:
            pipeline.check_retry(loaded, truncated=retry_truncated, console=err)
        if runner not in (None, "local", "ray", "dask"):
            raise UserError(f"--runner {runner!r}: use local, ray or dask")
    except UserError as e:
        _fail(e)
    except (lifecycle.Terminated, KeyboardInterrupt) as e:
        _stopped(e)
    try:
        if not os.environ.get("PREFECT_API_URL"):
            lifecycle.guard_children()  # Prefect's temporary API server ends with this process, even on SIGKILL
        # the servers start first (a minute here); Prefect is imported and started beside them
        with REGISTRY.failures_stick(), prewarm(loaded, gpus, gpu_memory), Display(TRACKER, live=sys.stderr.isatty()):
            from flows.pipeline import run_pipeline

            quiet_user_tracebacks()
            manifest = run_pipeline(config=config, params=loaded.params, limit=limit, output=output,
                                    retry_truncated=retry_truncated, runner=runner, gpus=gpus,
                                    retry_errors=retry_errors, gpu_memory=gpu_memory)
    except BaseException as e:  # noqa: BLE001 - a signal (ours, or Prefect's TerminationSignal), a user error, a crash
        if isinstance(e, (SystemExit, typer.Exit)):
            raise
        if STOPPING.is_set() or isinstance(e, (KeyboardInterrupt, lifecycle.Terminated)) or (
                type(e).__name__ == "TerminationSignal"):
            _stopped(e)
        if isinstance(e, UserError):
            _fail(e)
        if STATE["debug"]:
            raise
        err.print(f"[bold red]run failed:[/] {type(e).__name__}: {e}")
        raise typer.Exit(1) from None
    if lifecycle.cancelled():  # the flow returned its Cancelled state
        _stopped(lifecycle.Terminated())
    from modelyard.report import print_summary

    print_summary(out, manifest)


def _stopped(e: BaseException) -> None:
    """The run was stopped by a signal or cancelled from Prefect: say what is kept, exit 128 + the
    signal (130 for Ctrl-C, 143 for SIGTERM and for a cancel)."""
    import signal

    from modelyard import lifecycle

    signum = lifecycle.stop_signal() or (signal.SIGINT if isinstance(e, KeyboardInterrupt) else getattr(
        e, "signum", None) or getattr(e, "signal", None) or signal.SIGTERM)
    why = "cancelled from Prefect" if lifecycle.cancelled() else f"stopped by {signal.Signals(signum).name}"
    err.print(f"{why}: nothing was committed; finished shards are kept and a re-run resumes")
    raise typer.Exit(128 + int(signum))


@contextmanager
def prewarm(loaded, gpus: int | None, gpu_memory: float | None = None):
    """Start the managed servers now, beside Prefect's own start-up; the flow finds them running."""
    from modelyard import pipeline
    from modelyard.models import server_jobs, start_servers
    from modelyard.planner import plan_for
    from modelyard.serving import REGISTRY

    cfg = loaded.config
    if (len(plan_for(cfg, gpus, gpu_memory, loaded.base_dir).waves) > 1
            or pipeline.cached_models(loaded, {m for st in cfg.stages for m in st.models_used}) is not None):
        # waves: the flow stops each wave's servers, which holding them here would not; known models:
        # the flow tries the request cache first and starts servers only if it cannot answer
        yield
        return
    jobs = server_jobs(cfg, gpus, [n for n, m in cfg.models.items() if m.managed], 0, gpu_memory, loaded.base_dir)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="modelyard-prewarm")
    future = pool.submit(start_servers, loaded, jobs, reserve=True)
    try:
        yield
    finally:
        try:
            for s in future.result()[0].values():
                REGISTRY.unreserve(s)  # the flow claimed it (and stopped it as its last wave ended), or failed first
        except Exception:  # the flow has reported it already
            pass
        pool.shutdown(wait=False)


@app.command()
def validate(
    config: Annotated[str, typer.Argument(help="Pipeline YAML.")],
    param: Annotated[list[str], typer.Option("--param", "-p", help="KEY=VALUE for {KEY} placeholders.")] = [],  # noqa: B006
) -> None:
    """Check the config without calling a model; exit 2 listing every problem."""
    from modelyard import pipeline
    from modelyard.config import parse_params
    from modelyard.validate import check

    try:
        loaded = pipeline.load(config, parse_params(param), None)
        problems = check(loaded)
    except UserError as e:
        _fail(e)
    if problems:
        err.print(f"[bold red]{config}: {len(problems)} problem(s)[/]", soft_wrap=True)
        for p in problems:
            err.print(f"  - {p}", highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    cfg = loaded.config
    out.print(f"{config}: OK ({len(cfg.stages)} stages, {len(cfg.models)} models)")


@app.command()
def inspect(
    output: Annotated[str, typer.Argument(help="Output folder (or partition folder) holding _manifest.json.")],
    row: Annotated[Optional[str], typer.Option("--row", help="Show this row's full provenance.")] = None,
) -> None:
    """Show the manifest, per-stage statistics, and one row's provenance."""
    from modelyard.report import print_manifest, print_row

    try:
        if row is None:
            print_manifest(out, output)
        else:
            print_row(out, output, row)
    except UserError as e:
        _fail(e)


@app.command()
def report(
    output: Annotated[list[str], typer.Argument(help="Committed output(s); or a partitioned dataset folder.")],
    partitions: Annotated[bool, typer.Option("--partitions", help="Compare the committed partitions under "
                                             "OUTPUT (found by themselves when OUTPUT has no manifest).")] = False,
    to: Annotated[Optional[str], typer.Option("--out", help="Write the page here (default: _report.html in the "
                                              "one folder named, else ./modelyard-report.html).")] = None,
    open_: Annotated[bool, typer.Option("--open", help="Open the page in the web browser.")] = False,
) -> None:
    """Draw the run in pictures: one output's _report.html, or several partitions side by side."""
    from modelyard.charts import write as write_report

    try:
        path, sources = write_report(output, to, partitions)
    except UserError as e:
        _fail(e)
    what = f"{len(sources)} partitions side by side" if len(sources) > 1 else sources[0].label
    out.print(f"report ({what}): {path}", highlight=False)
    if open_:
        import webbrowser

        webbrowser.open(Path(path).resolve().as_uri() if "://" not in path else path)


@app.command()
def backfill(
    target: Annotated[str, typer.Argument(help="A config file (runs here, in order) or a deployment "
                                          "FLOW/NAME on the Prefect server (one flow run per partition).")],
    start: Annotated[str, typer.Option(help="First partition date, YYYY-MM-DD.")],
    end: Annotated[str, typer.Option(help="Last partition date, YYYY-MM-DD (inclusive).")],
    every: Annotated[str, typer.Option(help="Step between partitions: 1d, 7d, 1w …")] = "1d",
    force: Annotated[bool, typer.Option(help="Re-run partitions already committed by the same config.")] = False,
    parallel: Annotated[int, typer.Option(help="Deployment runs unfinished at once.")] = 2,
    wait: Annotated[bool, typer.Option(help="Wait for deployment runs to finish.")] = True,
    param: Annotated[list[str], typer.Option("--param", "-p", help="KEY=VALUE for other placeholders.")] = [],  # noqa: B006
) -> None:
    """One run per partition date from --start to --end; committed partitions are skipped unless --force."""
    from modelyard import backfill as bf
    from modelyard.config import parse_params

    prefect_defaults()
    try:
        days = bf.dates(start, end, every)
        is_config = target.endswith((".yaml", ".yml")) or Path(target).is_file()
        if is_config:
            params = parse_params(param)
            pipeline_check(target, {**params, "date": days[0]})
        elif not os.environ.get("PREFECT_API_URL"):
            raise UserError(f"{target!r} is not a config file, and a deployment needs a Prefect server: "
                            "set PREFECT_API_URL")
    except UserError as e:
        _fail(e)
    from rich.live import Live

    def table(parts):
        from rich.table import Table

        t = Table(title=f"backfill {target}  {start} … {end} every {every}")
        for c in ("partition", "state", "flow run", "rows", "note"):
            t.add_column(c)
        for p in parts:
            color = {"COMPLETED": "green", "SKIPPED": "cyan", "FAILED": "red", "CRASHED": "red"}.get(p.state, "yellow")
            t.add_row(p.date, f"[{color}]{p.state}[/]", p.flow_run or "-", "-" if p.rows is None else str(p.rows),
                      p.note)
        return t

    live = Live(table([]), console=out, auto_refresh=False, transient=not out.is_terminal) if out.is_terminal else None
    update = (lambda parts: live.update(table(parts), refresh=True)) if live else None
    try:
        if live:
            live.start()
        if is_config:
            from flows.pipeline import run_pipeline  # noqa: F401  (imports Prefect before the runs)

            quiet_user_tracebacks()
            parts = bf.run_local(target, days, parse_params(param), force, update)
        else:
            parts = bf.run_deployment_backfill(target, days, force, parallel, wait, update)
    except UserError as e:
        _fail(e)
    finally:
        if live:
            live.stop()
    if not live:
        out.print(table(parts))
    if any(p.state in ("FAILED", "CRASHED", "CANCELLED") for p in parts):
        raise typer.Exit(1)


def pipeline_check(config: str, params: dict[str, str]) -> None:
    from modelyard import pipeline

    pipeline.prepare(pipeline.load(config, params, None))


@app.command()
def deploy(
    prefect_yaml: Annotated[Optional[str], typer.Argument(help="Default: deployments/prefect.yaml.")] = None,
) -> None:
    """Register the deployments (schedules included) with the Prefect server."""
    from modelyard.deploy import deploy as do_deploy

    prefect_defaults()
    try:
        created, text = do_deploy(prefect_yaml)
    except UserError as e:
        _fail(e)
    for name in created:
        out.print(f"created process work pool {name!r}")
    out.print(text.strip())
    out.print("start a worker with: prefect worker start --pool <pool>")


@app.command()
def serve(
    config: Annotated[str, typer.Argument(help="Pipeline YAML.")],
    cron: Annotated[str, typer.Option(help="Cron schedule, e.g. '0 2 * * *'.")],
    timezone: Annotated[str, typer.Option(help="Time zone of the schedule and of the partition dates.")] = "UTC",
    param: Annotated[list[str], typer.Option("--param", "-p", help="KEY=VALUE for other placeholders.")] = [],  # noqa: B006
) -> None:
    """Serve one config on a schedule from this process (Prefect `serve`)."""
    from modelyard import pipeline
    from modelyard.config import parse_params

    prefect_defaults()
    try:
        params = parse_params(param)
        loaded = pipeline.load(config, params, None)
        pipeline.prepare(loaded)
        pipeline.run_date(None, timezone)
    except UserError as e:
        _fail(e)
    from prefect.schedules import Cron

    from flows.pipeline import run_pipeline

    quiet_user_tracebacks()
    run_pipeline.serve(name=loaded.config.name, schedules=[Cron(cron, timezone=timezone)],
                       parameters={"config": str(Path(config).resolve()), "params": params, "timezone": timezone})


cache_app = typer.Typer(help="The request cache: size report and pruning.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


def _cache_for(config: str, param: list[str]):
    from modelyard import pipeline
    from modelyard.cache import open_cache
    from modelyard.config import parse_params

    loaded = pipeline.load(config, parse_params(param), None)
    path = pipeline.cache_path(loaded.config)
    if path is None:
        raise UserError(f"{config}: cache.enabled is false: there is no request cache")
    return path, open_cache(path)


@cache_app.command("info")
def cache_info(
    config: Annotated[str, typer.Argument(help="Pipeline YAML whose cache to report on.")],
    param: Annotated[list[str], typer.Option("--param", "-p")] = [],  # noqa: B006
) -> None:
    """Entries and size per model and revision."""
    from rich.table import Table

    try:
        path, cache = _cache_for(config, param)
    except UserError as e:
        _fail(e)
    t = Table(title=f"request cache {path}")
    for c in ("model", "revision", "entries", "MB"):
        t.add_column(c)
    for r in cache.report():
        t.add_row(r["model"], r["revision"], str(r["entries"]), f"{r['bytes'] / 1e6:.2f}")
    out.print(t)


@cache_app.command("prune")
def cache_prune(
    config: Annotated[str, typer.Argument(help="Pipeline YAML whose cache to prune.")],
    older_than_days: Annotated[Optional[float], typer.Option(help="Drop entries unused for this many days.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Drop every entry of this model id.")] = None,
    max_mb: Annotated[Optional[float], typer.Option(help="Keep at most this many MB, most recently used first.")] = None,
    param: Annotated[list[str], typer.Option("--param", "-p")] = [],  # noqa: B006
) -> None:
    """Delete cache entries by age, model or total size."""
    if older_than_days is None and model is None and max_mb is None:
        _fail(UserError("say what to prune: --older-than-days, --model or --max-mb"))
    try:
        path, cache = _cache_for(config, param)
    except UserError as e:
        _fail(e)
    n = cache.prune(older_than_s=None if older_than_days is None else older_than_days * 86400, model=model,
                    max_bytes=None if max_mb is None else int(max_mb * 1e6))
    out.print(f"pruned {n} entries from {path}")


def main() -> None:
    """The command line. When it is done, the exit handlers run (Prefect's ephemeral API stops, its
    log and event workers drain, managed servers are stopped) and the process ends without the
    interpreter's module-by-module teardown, which took 0.5-1.3 s after each run here, for nothing."""
    code: int | str | None = 0
    try:
        app()
    except SystemExit as e:
        code = e.code
    _fast_exit(code)


def _fast_exit(code: int | str | None) -> None:
    """Exit as the interpreter does (threads' exit hooks, where Prefect drains its log and event
    workers, and joins; then atexit), minus the teardown of every module."""
    import atexit
    import threading

    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is None:  # not CPython as we know it: the normal way
        sys.exit(code)
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code or 0)


if __name__ == "__main__":
    main()
