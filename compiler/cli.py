"""The ``accelc`` command line (click + rich)."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .cache import DEFAULT_LOCK_TIMEOUT_S
from .errors import AccelcError
from .pass_api import DEFAULT_USER_CODE_TIMEOUT_S

console = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def _fail(e: AccelcError) -> None:
    console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
    sys.exit(e.exit_code)


#: Exit status after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130


class _Group(click.Group):
    """Turns AccelcError into a clean message and exit code; anything else keeps its traceback.

    Ctrl-C exits 130 with a one-line note: every pass that completed is in the cache, and
    the interrupted one left nothing a later build would trust.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AccelcError as e:
            _fail(e)
        except KeyboardInterrupt:
            console.print(
                "[yellow]interrupted[/]: completed passes stay cached; the interrupted one left nothing behind"
            )
            sys.exit(EXIT_INTERRUPTED)


def _summary(metrics: dict[str, Any]) -> str:
    no_finite = ("top1_agreement" in metrics and metrics["top1_agreement"] is None) or (
        "neighbor_recall" in metrics and metrics["neighbor_recall"] is None
    )
    if no_finite:
        return f"no finite outputs ({metrics.get('nonfinite_samples')} of {metrics.get('samples')} samples non-finite)"
    if "top1_agreement" in metrics:
        return (
            f"top-1 agree {metrics['top1_agreement']:.4f}, cosine {metrics['cosine']:.5f}, "
            f"max abs err {metrics['max_abs_error']:.3g}"
        )
    if "neighbor_recall" in metrics:
        bad = metrics.get("nonfinite_samples") or 0
        return (
            f"{metrics.get('output_kind')}: cosine {metrics['cosine']:.5f} (min {metrics['cosine_min']:.4f}), "
            f"neighbour recall@{metrics.get('recall_k')} {metrics['neighbor_recall']:.3f}"
            + (f"; {bad} of {metrics.get('samples')} samples non-finite" if bad else "")
        )
    if "batch" in metrics:
        parts = [
            f"bs{bs}: p50 {b['p50_ms']:.2f} ms, p99 {b['p99_ms']:.2f} ms, {b['throughput']:.0f}/s"
            for bs, b in metrics["batch"].items()
        ]
        return "; ".join(parts) + f" ({metrics.get('threads')} threads)"
    keep = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in list(keep.items())[:4])


class RichReporter:
    """Progress display: per running pass a live ``rich.progress`` display (a spinner with the pass's
    status line, and a bar with counts, elapsed time and ETA for each counted step it reports:
    sensitivity units, trials, calibration batches, timed runs), then one line per finished pass."""

    def __init__(self, console: Console):
        self.console = console
        self.progress: Any = None
        self.main_task: Any = None
        self.tasks: dict[str, Any] = {}

    def stage_started(self, node_id: str, pass_name: str) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._stop()
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self.progress.start()
        self.main_task = self.progress.add_task(f"[bold]{escape(node_id)}[/] running…", total=None)
        self.tasks = {}

    def stage_progress(self, node_id: str, message: str) -> None:
        if self.progress is not None:
            self.progress.update(self.main_task, description=f"[bold]{escape(node_id)}[/] {escape(message)}")

    def stage_count(self, node_id: str, message: str, done: int, total: int) -> None:
        """A counted step: ``done`` of ``total`` (sensitivity units, trials, batches, timed runs)."""
        if self.progress is None:
            return
        task = self.tasks.get(message)
        if task is None:
            task = self.tasks[message] = self.progress.add_task(f"  {escape(message)}", total=total)
        self.progress.update(task, completed=done, total=total)

    def _stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def stage_finished(self, node_id: str, cached: bool, seconds: float, metrics: dict[str, Any]) -> None:
        self._stop()
        state = metrics.get("status")
        if state == "blocked":
            mark = "[yellow]⊘ blocked[/]"
        elif state == "failed":
            mark = "[red]✗ failed [/]"
        else:
            mark = "[cyan]● cached [/]" if cached else "[green]✓ built  [/]"
        detail = _summary({k: v for k, v in metrics.items() if k != "status"})
        self.console.print(f"{mark} {escape(f'{node_id:<22}')} {seconds:7.2f}s  [dim]{escape(detail)}[/]")

    def notice(self, message: str) -> None:
        self.console.print(f"[yellow]![/] {message}")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="accelc")
def main() -> None:
    """accelc: compile a PyTorch model into a verified, cached deployable artifact.

    \b
    A YAML recipe names the model, its inputs, the target (cpu, t4, ...), the
    precision and the data to calibrate and verify on. accelc validates it, lowers
    it to a pass graph, runs each pass once (results are cached by content hash)
    and checks accuracy against the source model after the stages you choose.

    \b
    Start here:
      accelc build recipes/efficientnet_lite0_cpu_int8.yaml
      accelc plan  recipes/resnet18_t4_int8.yaml     # graph, cache keys, what runs here
      accelc passes                                  # every pass, its inputs and needs
      accelc passes quantize                         # one pass: what it does, every option
    """


_cache_opt = click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="ACCELC_CACHE_DIR",
    help="Artifact store (default: the user cache dir; env ACCELC_CACHE_DIR).",
)
_target_opt = click.option("--target", "-t", help="Override the recipe's target (see `accelc targets`).")
_cache_url_opt = click.option(
    "--cache-url",
    envvar="ACCELC_CACHE_URL",
    help="Shared remote cache behind the local one (s3://bucket/prefix, gs://..., file:///mount/...; "
    "env ACCELC_CACHE_URL). Credentials and endpoint come from the environment (AWS_ENDPOINT_URL, ...).",
)


_executor_opt = click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: every pass on this machine; ray: every pass as a Ray task on a cluster node with what it "
    "needs (GPU passes on a GPU of the target's type). Needs the [cluster] extra.",
)


@main.command()
@click.argument("recipes", nargs=-1, required=True, type=click.Path(path_type=Path))
@_target_opt
@click.option(
    "--out",
    "-o",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Output directory (default: build/<recipe name>; with several recipes: OUT/<recipe file stem>).",
)
@_cache_opt
@click.option(
    "--no-cache", is_flag=True, help="Rebuild every pass in a private store; the shared cache is not touched."
)
@click.option("--json", "as_json", is_flag=True, help="Print report.json to stdout when done.")
@_cache_url_opt
@_executor_opt
@click.option(
    "--ray-address",
    envvar="RAY_ADDRESS",
    help="Ray cluster to run on with --executor ray (host:6379, ray://host:10001 or auto; env RAY_ADDRESS). "
    "Default: a local Ray instance.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace files in the out dir that accelc did not write (model.onnx, report.json...) instead of refusing.",
)
@click.option(
    "--user-code-timeout",
    type=click.FloatRange(min=0, min_open=True),
    envvar="ACCELC_USER_CODE_TIMEOUT",
    default=DEFAULT_USER_CODE_TIMEOUT_S,
    show_default=True,
    help="Seconds the model's own code (a python source's callable) may take before the build gives up "
    "(env ACCELC_USER_CODE_TIMEOUT).",
)
@click.option(
    "--lock-timeout",
    type=click.FloatRange(min=0),
    envvar="ACCELC_LOCK_TIMEOUT",
    default=DEFAULT_LOCK_TIMEOUT_S,
    show_default=True,
    help="Seconds to wait for another build computing the same cache entry (env ACCELC_LOCK_TIMEOUT).",
)
def build(
    recipes: tuple[Path, ...],
    target: str | None,
    out_dir: Path | None,
    cache_dir: Path | None,
    no_cache: bool,
    as_json: bool,
    cache_url: str | None,
    executor: str,
    ray_address: str | None,
    force: bool,
    user_code_timeout: float,
    lock_timeout: float,
) -> None:
    """Build RECIPE...: run every pass (or reuse it from the cache), verify, benchmark.

    \b
    The out dir receives the final artifact (e.g. model.onnx), report.json,
    report.md and accelc.lock (every node's cache key and digest, package
    versions, host). Each build publishes them as one new generation
    (.accelc/generations/<id>/, switched atomically; the top-level names are
    links into it). A name holding a file accelc did not write is refused
    unless --force. Exit codes: 0 ok, 2 bad recipe/input/out dir, 3 a pass
    needs hardware this host lacks, 4 a pass failed or timed out, 5
    verification failed, 6 cache or out dir unusable (or a lock wait timed out).
    With --executor ray, several recipes share their common upstream nodes.
    """
    from .build import build as run_build

    reporter = RichReporter(console)
    for name, value in (("--user-code-timeout", user_code_timeout), ("--lock-timeout", lock_timeout)):
        if not math.isfinite(value):
            raise click.BadParameter(f"{value} is not a finite number of seconds", param_hint=name)
    if executor == "ray":
        if no_cache:
            raise click.UsageError("--no-cache does not apply to --executor ray (the workers share the cache)")
        from .ray_executor import build_on_ray

        outcomes = build_on_ray(
            list(recipes),
            target=target,
            out_dir=out_dir,
            cache_dir=cache_dir,
            cache_url=cache_url,
            ray_address=ray_address,
            reporter=reporter,
        )
    else:
        outcomes = [
            run_build(
                recipe,
                target=target,
                out_dir=(out_dir / recipe.stem if out_dir and len(recipes) > 1 else out_dir),
                cache_dir=cache_dir,
                no_cache=no_cache,
                reporter=reporter,
                cache_url=cache_url,
                force=force,
                user_code_timeout=user_code_timeout,
                lock_timeout=lock_timeout,
            )
            for recipe in recipes
        ]
    for outcome in outcomes:
        rep = outcome.report
        table = Table(
            title=f"{rep['recipe']['name']} → {rep['target']}/{rep['runtime']}/{rep['precision']}",
            title_justify="left",
        )
        cols = ["stage", "status", "cached", "s", "result"]
        cluster = any(s.get("ran_on") for s in rep["stages"])
        for col in cols + (["ran on"] if cluster else []):
            table.add_column(col, overflow="fold")
        for s in rep["stages"]:
            table.add_row(
                escape(s["node"]),
                s["status"],
                "yes" if s["cached"] else "no",
                f"{s['seconds']:.2f}",
                _summary(s["metrics"]),
                *([escape(s.get("ran_on") or "-")] if cluster else []),
            )
        console.print(table)
        if as_json:
            out.print_json(json.dumps(rep, default=str))
        if outcome.ok:
            from .report import headline

            console.print(escape(headline(rep)))
            console.print(
                f"[green]done[/]: {outcome.out_dir / rep['final_artifact']}  (report: {outcome.out_dir / 'report.md'})"
            )
    failed = [o for o in outcomes if not o.ok]
    if failed:
        _fail(failed[0].result.failure)  # type: ignore[arg-type]


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@_target_opt
@_cache_opt
@click.option(
    "--out",
    "-o",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Out dir whose accelc.lock explains why nodes are not cached.",
)
@_cache_url_opt
@_executor_opt
def plan(
    recipe: Path, target: str | None, cache_dir: Path | None, out_dir: Path | None, cache_url: str | None, executor: str
) -> None:
    """Show RECIPE's pass graph in execution order: each node's inputs, cache key, whether it is
    cached, and whether it can run on this host (and if not, why). Runs nothing. With
    --executor ray: what each node's Ray task asks for instead of this host's capabilities."""
    from .build import plan as run_plan

    graph, nodes = run_plan(recipe, target=target, cache_dir=cache_dir, out_dir=out_dir, cache_url=cache_url)
    if executor == "ray":
        _plan_ray(graph, nodes)
        return
    t = Table(
        title=f"{graph.recipe.name}: target {graph.target.name}, runtime {graph.runtime}, {graph.recipe.precision}",
        title_justify="left",
    )
    # node names have no spaces to wrap at: at 80 columns they keep their width, the rest wraps
    narrow = out.width < 100
    longest = max((len(p.id) for p in nodes), default=4)
    cols = ("#", "node", "key", "status", "why") if narrow else (
        "#", "node", "inputs", "produces", "key", "status", "why")
    for col in cols:
        t.add_column(col, overflow="fold", min_width=min(longest, 24) if col == "node" else None)
    style = {"cached": "cyan", "run": "green", "blocked": "yellow"}
    for i, pn in enumerate(nodes, 1):
        n = graph.by_id[pn.id]
        final = " [bold](final)[/]" if pn.id == graph.final else ""
        reason = ("needs " + ", ".join(c for c, _ in pn.missing)) if pn.status == "blocked" else pn.reason
        t.add_row(
            str(i),
            escape(pn.id) + final,
            *([] if narrow else [escape(", ".join(n.inputs.values())), n.produces]),
            pn.key[:8],
            f"[{style[pn.status]}]{pn.status}[/]",
            escape(reason),
        )
    out.print(t)
    if narrow:
        out.print("(each node's inputs and kind: at 100 columns or more)")
    blocked = [p for p in nodes if p.status == "blocked"]
    if blocked:
        found = {c: d for p in blocked for c, d in p.missing}
        out.print(
            f"[yellow]{len(blocked)} node(s) cannot run on this host; a build stops at {escape(blocked[0].id)}.[/]"
        )
        for c, d in found.items():
            out.print(f"  missing [bold]{escape(c)}[/]: {escape(d)}")


def _plan_ray(graph: Any, nodes: Any) -> None:
    """``accelc plan --executor ray``: each node's key, cache status and Ray resources."""
    from .ray_executor import plan_resources
    from .registry import default_registry

    res = plan_resources(graph, default_registry())
    t = Table(title=f"{graph.recipe.name}: target {graph.target.name} on a Ray cluster", title_justify="left")
    for col in ("#", "node", "inputs", "produces", "key", "status", "Ray task needs"):
        t.add_column(col, overflow="fold")
    for i, pn in enumerate(nodes, 1):
        n = graph.by_id[pn.id]
        status = "cached" if pn.status == "cached" else "run"
        t.add_row(
            str(i),
            escape(pn.id) + (" [bold](final)[/]" if pn.id == graph.final else ""),
            escape(", ".join(n.inputs.values())),
            n.produces,
            pn.key[:12],
            status,
            escape(res[pn.id].describe()),
        )
    out.print(t)


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@_target_opt
def validate(recipe: Path, target: str | None) -> None:
    """Check RECIPE against the schema and every pass's option schema, and lower it. Runs nothing."""
    from .build import prepare

    graph, _ = prepare(recipe, target)
    out.print(f"[green]ok[/]: {recipe} ({len(graph.nodes)} nodes, final: {graph.final})")


_RST_ROLE = re.compile(r":[a-zA-Z]+(?::[a-zA-Z]+)?:`~?([^`<]+?)(?:\s*<[^>]*>)?`")
_RST_LITERAL = re.compile(r"``([^`]+)``")


def plain(text: str) -> str:
    """Docstring text for a terminal: reStructuredText roles (``:func:`x```, ``:class:`~a.B```)
    become their target's name, double-backtick literals lose their backticks, ``::`` ends in ``:``,
    and hard-wrapped paragraph lines are joined so the terminal wraps them at word boundaries
    (bullets and indented lines keep their own lines)."""
    import inspect

    def role(m: re.Match[str]) -> str:
        target = m.group(1).strip()
        return target.rsplit(".", 1)[-1] if m.group(0).split("`", 1)[1].startswith("~") else target

    text = _RST_LITERAL.sub(r"\1", _RST_ROLE.sub(role, inspect.cleandoc(text)))
    text = re.sub(r"::$", ":", text, flags=re.M)
    out: list[str] = []
    for line in text.splitlines():
        starts_item = re.match(r"^(\s+|[-*] |\d+[.)] |[A-Z][\w ]*:$)", line) is not None
        if out and out[-1] and line.strip() and not starts_item and not out[-1].endswith(":"):
            out[-1] = out[-1].rstrip() + " " + line.strip()
        elif out and out[-1] and line.startswith("  ") and re.match(r"^(\s*)[-*] ", out[-1] or "") is not None:
            out[-1] = out[-1].rstrip() + " " + line.strip()  # continuation of a bullet
        else:
            out.append(line.rstrip())
    return "\n".join(out)


def _block(title: str, rows: list[tuple[str, str]], body: str = "", indent: int = 2) -> None:
    """One entry of a listing, readable at 80 columns: a bold title, then label/value rows with the
    value wrapped at word boundaries, then an optional paragraph."""
    out.print(title, highlight=False)
    grid = Table.grid(padding=(0, 1))
    grid.add_column(width=max([len(r[0]) for r in rows] + [8]) + 2, no_wrap=True, style="dim")
    grid.add_column(overflow="fold")
    for label, text in rows:
        grid.add_row(f"  {label}", escape(text))
    if rows:
        out.print(grid)
    if body:
        from rich.padding import Padding

        out.print(Padding(escape(body), (0, 0, 0, indent)))


def _flat_options(schema: dict[str, Any], prefix: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every option of a JSON Schema object, nested objects as dotted names (``preprocess.resize``)."""
    rows: list[tuple[str, dict[str, Any]]] = []
    for name in sorted((schema or {}).get("properties", {})):
        spec = schema["properties"][name]
        dotted = f"{prefix}{name}"
        nested = spec.get("properties") if spec.get("type") == "object" else None
        if nested:
            if spec.get("description"):
                rows.append((dotted, {**spec, "type": "object"}))
            rows += _flat_options(spec, dotted + ".")
        else:
            rows.append((dotted, spec))
    return rows


def _print_options(schema: dict[str, Any], title: str) -> None:
    from rich.padding import Padding

    rows = _flat_options(schema)
    if not rows:
        out.print(f"{title}: none")
        return
    out.print(f"[bold]{escape(title)}[/]")
    for opt, spec in rows:
        default = f"  (default {json.dumps(spec['default'])})" if "default" in spec else ""
        out.print(f"  [bold]{escape(opt)}[/]  {escape(_option_type(spec))}{escape(default)}", highlight=False)
        meaning = plain(spec.get("description", "")) or "-"
        out.print(Padding(escape(meaning), (0, 0, 0, 6)))


@main.command()
@click.argument("name", required=False)
def passes(name: str | None) -> None:
    """List every registered pass: plugin, version, inputs, output and host requirements.

    With NAME, describe that pass: its full description and every option a recipe may set
    (type, default, meaning), e.g. `accelc passes quantize`. Model and data sources: `accelc sources`.
    """
    from .registry import default_registry
    from .sources import did_you_mean

    reg = default_registry()
    if name is not None:
        if name not in reg.passes:
            where = ""
            if name in reg.model_sources or name in reg.data_sources:
                what = "model" if name in reg.model_sources else "data"
                where = f"; '{name}' is a {what} source: accelc sources {name}"
            raise click.BadParameter(
                f"no pass '{name}'{did_you_mean(name, reg.passes)}{where} (known: {', '.join(sorted(reg.passes))})",
                param_hint="NAME",
            )
        _describe_pass(reg, name)
        return
    for name in sorted(reg.passes):
        p = reg.passes[name]
        consumes = "; ".join(f"{s.name}: {_slot_kinds(s)}" + (" (optional)" if s.optional else "") for s in p.inputs)
        _block(
            f"[bold]{escape(name)}[/]  [dim]{escape(reg.plugin_of('passes', name))}, version {p.version}[/]",
            [("consumes", consumes or "-"), ("produces", p.produces), ("requires", ", ".join(p.requires) or "-")],
            plain(p.summary()),
        )
        out.print()


def _slot_kinds(slot: Any, limit: int = 3) -> str:
    """The kinds a slot accepts: ``onnx|onnx.qdq``, or ``any runnable kind``."""
    if not slot.kinds or len(slot.kinds) > limit:
        return "any runnable kind" if slot.runnable or len(slot.kinds) > limit else "-"
    return "|".join(slot.kinds) + (" or any runnable kind" if slot.runnable else "")


def _option_type(spec: dict[str, Any]) -> str:
    if "enum" in spec:
        return " | ".join(json.dumps(v) for v in spec["enum"])
    kind = spec.get("type", "any")
    if kind == "array" and isinstance(spec.get("items"), dict):
        items = spec["items"]
        return "array of " + ("|".join(map(str, items["enum"])) if "enum" in items else items.get("type", "any"))
    bounds = [f"{op} {spec[k]}" for k, op in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="))
              if k in spec]
    return ", ".join([str(kind), *bounds])


def _describe_pass(reg: Any, name: str) -> None:
    """Print a pass's description (terminal text, no RST markup) and every option (from its JSON Schema)."""
    p = reg.passes[name]
    consumes = "; ".join(f"{s.name}: {_slot_kinds(s, 99)}" + (" (optional)" if s.optional else "") for s in p.inputs)
    _block(
        f"[bold]{escape(name)}[/] (plugin {escape(reg.plugin_of('passes', name))}, version {p.version})",
        [("consumes", consumes or "-"), ("produces", p.produces), ("requires", ", ".join(p.requires) or "-")],
    )
    out.print()
    out.print(escape(plain(p.description or p.__doc__ or "")) + "\n")
    _print_options(p.options_schema or {}, f"options of {name}")


@main.command()
@click.argument("name", required=False)
def sources(name: str | None) -> None:
    """List model sources (model.source in a recipe) and data sources (data.calibration /
    data.validation). With NAME, describe one and every option it takes, e.g. `accelc sources images`.

    \b
    A recipe picks a model source with model.source; the other keys of model are its options.
    A dataset entry picks its data source with source, or by its key (images: or tensors:).
    Paths are relative to the recipe.
    """
    from .registry import default_registry
    from .sources import did_you_mean

    reg = default_registry()
    cats = (("model source", "model_sources", reg.model_sources), ("data source", "data_sources", reg.data_sources))
    if name is not None:
        for label, cat, known in cats:
            if name in known:
                src = known[name]
                _block(f"[bold]{escape(name)}[/] ({label}, plugin {escape(reg.plugin_of(cat, name))})", [])
                out.print()
                out.print(escape(plain(type(src).__doc__ or src.description or "")) + "\n")
                example = _source_example(label, name, src)
                if example:
                    out.print("[bold]in a recipe[/]")
                    out.print(escape(example) + "\n", highlight=False)
                _print_options(src.options_schema, f"options of {name}")
                return
        every = [*reg.model_sources, *reg.data_sources]
        raise click.BadParameter(f"no source '{name}'{did_you_mean(name, every)} (known: {', '.join(sorted(every))})",
                                 param_hint="NAME")
    for label, cat, known in cats:
        out.print(f"[bold]{label}s[/]")
        for n in sorted(known):
            src = known[n]
            _block(f"  [bold]{escape(n)}[/]  [dim]{escape(reg.plugin_of(cat, n))}[/]", [],
                   plain(src.description or (type(src).__doc__ or "").strip().splitlines()[0]), indent=4)
        out.print()
    out.print("Describe one: accelc sources NAME")


def _source_example(label: str, name: str, src: Any) -> str:
    """A recipe snippet using the source with its required options (placeholders)."""
    schema = src.options_schema or {}
    required = [k for k in schema.get("required", []) if k != "source"]
    samples = {"images": "images/", "tensors": "data.npz", "name": "resnet18", "callable": "my_model:build"}
    if label == "model source":
        lines = ["model:", f"  source: {name}"] + [f"  {k}: {samples.get(k, '...')}" for k in required]
        if name == "python":
            lines.append("  path: .            # the folder holding my_model.py, relative to the recipe")
        return "\n".join(lines)
    lines = ["data:", "  calibration:", f"    source: {name}"]
    lines += [f"    {k}: {samples.get(k, '...')}" for k in required]
    return "\n".join(lines)


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--top-k", "-k", type=click.IntRange(min=1), default=5, show_default=True, help="Classes shown per image."
)
@click.option("--device", help="Run on this device (default: the target's, as deploy.json records it).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
def predict(out_dir: Path, files: tuple[Path, ...], top_k: int, device: str | None, as_json: bool) -> None:
    """Run a build's artifact (OUT_DIR, as accelc build wrote it) on FILE...

    \b
    Image recipes: FILE... are images, preprocessed exactly as the build's data
    (resize, center crop, mean/std from deploy.json), one call each; prints the
    top-k classes (ImageNet names for a 1000-class output).
    Other recipes: FILE is a .npy (the first input) or .npz (arrays named after
    the inputs); prints each output's shape, dtype and first values.
    """
    import numpy as np

    from .runtime import load

    pred = load(out_dir, **({"device": device} if device else {}))
    results: list[dict[str, Any]] = []
    images = pred.preprocessing is not None and all(f.suffix.lower() not in (".npy", ".npz") for f in files)
    for f in files:
        if not f.is_file():
            raise click.BadParameter(f"{f}: file not found", param_hint="FILE")
        if images:
            outs = pred(pred.preprocess([f]))
            top = pred.top_k(outs[0], k=top_k)[0]
            results.append({"file": str(f), "top_k": [{"index": i, "label": n, "probability": p} for i, n, p in top]})
        else:
            try:
                loaded = np.load(f, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise click.BadParameter(f"{f}: not a .npy/.npz file: {e}", param_hint="FILE") from e
            if isinstance(loaded, np.ndarray):
                feeds = {pred.input_names[0]: loaded}
            else:
                feeds = {k: loaded[k] for k in loaded.files if k in pred.input_names}
            try:
                outs = pred(**feeds)
            except TypeError as e:
                raise click.BadParameter(f"{f}: {e}", param_hint="FILE") from e
            results.append({
                "file": str(f),
                "outputs": [{"shape": list(o.shape), "dtype": str(o.dtype),
                             "values": np.asarray(o).reshape(-1)[:8].round(6).tolist()} for o in outs],
            })
    if as_json:
        out.print_json(json.dumps(results))
        return
    for r in results:
        out.print(f"[bold]{escape(r['file'])}[/]")
        for t in r.get("top_k", []):
            name = t["label"] if t["label"] is not None else f"class {t['index']}"
            out.print(f"  {t['probability']:7.2%}  {escape(name)}  [dim](index {t['index']})[/]")
        for i, o in enumerate(r.get("outputs", [])):
            vals = ", ".join(f"{v:.4g}" for v in o["values"])
            more = ", ..." if len(o["values"]) == 8 else ""
            out.print(f"  output {i}: shape {o['shape']} {o['dtype']}: {escape(vals)}{more}")


@main.command()
@click.option("--model", "model_ref", required=True,
              help="torchvision:NAME (e.g. torchvision:resnet18) or python:MODULE:CALLABLE (e.g. "
              "python:my_model:build, with --path for its folder).")
@click.option("--path", "model_path", help="Folder holding the python model's module, relative to the recipe "
              "(default: the recipe's folder, '.').")
@click.option("--weights", help="state_dict file for the model (relative to the recipe).")
@click.option("--input-shape", default="1,3,224,224", show_default=True,
              help="The example input shape, comma-separated; a leading 1 becomes a dynamic batch (1..32).")
@click.option("--input-name", default="input", show_default=True)
@click.option("--target", "-t", "target_name", default="cpu", show_default=True, help="See `accelc targets`.")
@click.option("--precision", type=click.Choice(["int8", "fp16", "fp32"]),
              help="Default: int8 on cpu, the target's first precision elsewhere.")
@click.option("--data", "data_path", required=True,
              help="Calibration data: an image folder (image-shaped inputs) or a .npy/.npz file; relative to the "
              "recipe.")
@click.option("--validation", "validation_path", help="Validation data, as --data (default: --data, other crops).")
@click.option("--name", help="Recipe name (default: from the model and target).")
@click.option("--output", "-o", "dest", type=click.Path(dir_okay=False, path_type=Path), default=Path("recipe.yaml"),
              show_default=True)
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def init(model_ref: str, model_path: str | None, weights: str | None, input_shape: str, input_name: str,
         target_name: str, precision: str | None, data_path: str, validation_path: str | None, name: str | None,
         dest: Path, force: bool) -> None:
    """Write a starting recipe from a few flags, checked as accelc validate checks it.

    \b
    Example:
      accelc init --model torchvision:resnet18 --weights resnet18.pt --data photos/
      accelc init --model python:my_model:build --input-shape 1,3,32,32 --data cal.npz
    The recipe is written only if it validates (paths are checked, relative to it).
    """
    import os
    import tempfile

    import yaml

    from .build import prepare
    from .errors import RecipeError
    from .registry import default_registry

    if dest.exists() and not force:
        raise click.UsageError(f"{dest} exists; pass --force to overwrite it")
    kind, _, ref = model_ref.partition(":")
    if kind == "torchvision" and ref:
        model: dict[str, Any] = {"source": "torchvision", "name": ref}
    elif kind == "python" and ":" in ref:
        model = {"source": "python", "callable": ref, "path": model_path or "."}
    else:
        raise click.BadParameter("expected torchvision:NAME or python:MODULE:CALLABLE", param_hint="--model")
    if weights:
        model["weights"] = {"file": weights}
    try:
        shape = [int(v) for v in input_shape.replace("x", ",").split(",") if v.strip()]
    except ValueError as e:
        raise click.BadParameter(
            f"'{input_shape}': expected integers like 1,3,224,224", param_hint="--input-shape"
        ) from e
    inp: dict[str, Any] = {"name": input_name, "shape": shape, "dtype": "float32"}
    if shape and shape[0] == 1:
        inp["dynamic"] = [{"axis": 0, "name": "batch", "min": 1, "opt": 1, "max": 32}]
    reg = default_registry()
    tp = reg.targets.get(target_name)
    if tp is None:
        from .sources import did_you_mean

        raise click.BadParameter(f"unknown target '{target_name}'{did_you_mean(target_name, reg.targets)} "
                                 f"(known: {', '.join(sorted(reg.targets))})", param_hint="--target")
    precs = list(tp.runtimes.get(tp.default_runtime, {}))
    precision = precision or ("int8" if "int8" in precs else precs[0])
    image = len(shape) == 4 and shape[1] == 3 and shape[2] == shape[3]

    def dataset(path: str, seed: int) -> dict[str, Any]:
        if path.endswith((".npy", ".npz")):
            return {"tensors": path}
        crop = shape[2] if image else 224
        return {"images": path, "preprocess": {"resize": round(crop * 256 / 224), "crop": crop},
                "crops": {"per_image": 4, "min_scale": 0.25, "seed": seed}}

    doc: dict[str, Any] = {
        "name": name or re.sub(r"[^A-Za-z0-9_.-]", "_", f"{ref.split(':')[-1]}_{target_name}_{precision}"),
        "model": model,
        "inputs": [inp],
        "target": target_name,
        "precision": precision,
        "data": {"calibration": dataset(data_path, 0), "validation": dataset(validation_path or data_path, 1)},
        "verify": {"tolerances": {"top1_agreement": 0.95, "cosine": 0.99}},
        "benchmark": {"batch_sizes": [1, 8], "warmup": 10, "iterations": 50},
    }
    header = ("# Written by accelc init; edit freely (accelc sources / accelc passes NAME list every option).\n"
              "# Check it with: accelc validate " + str(dest) + "\n")
    text = header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        try:
            graph, _ = prepare(tmp)  # validated where it will live: relative paths resolve the same
        except RecipeError as e:  # name the file the user asked for, not the temporary one
            raise RecipeError(str(dest), e.issues) from None
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
    out.print(f"[green]wrote[/] {escape(str(dest))}: {graph.recipe.name}, {len(graph.nodes)} nodes "
              f"(target {target_name}, {precision}); next: accelc build {escape(str(dest))}")


@main.command()
def targets() -> None:
    """List target profiles: device, capabilities and default pipeline per runtime and precision
    (* marks the stages verified; options in braces apply when the build verifies with tolerances)."""
    from .registry import default_registry

    reg = default_registry()
    for name in sorted(reg.targets):
        tp = reg.targets[name]
        rows = [("device", f"{tp.device}; needs {', '.join(tp.capabilities) or '-'}")]
        for rt, by_prec in tp.runtimes.items():
            for prec, pl in by_prec.items():
                extra = {x.name: x.options for x in getattr(pl, "when_verified", ())}
                steps = " → ".join(
                    s.name
                    + ("*" if s.name in pl.verify_after else "")
                    + (" {" + ", ".join(f"{k}: {v}" for k, v in extra[s.name].items()) + "}" if s.name in extra else "")
                    for s in pl.steps
                )
                rows.append((f"{rt} {prec}" + (" (default)" if rt == tp.default_runtime else ""), steps))
        _block(
            f"[bold]{escape(name)}[/]  {escape(tp.description)}  [dim]{escape(reg.plugin_of('targets', name))}[/]", rows
        )
        out.print()


@main.command()
def plugins() -> None:
    """List loaded plugins (built-in and from the accelc.plugins entry-point group): version, the hooks
    each implements and what it registers. ACCELC_PLUGINS / ACCELC_DISABLE_PLUGINS choose them."""
    from .registry import default_registry

    reg = default_registry()
    cats = (
        ("passes", "passes"),
        ("targets", "targets"),
        ("runtimes", "runtimes"),
        ("kinds", "artifact kinds"),
        ("capabilities", "capabilities"),
        ("model_sources", "model sources"),
        ("data_sources", "data sources"),
    )
    # One block per plugin (a table squeezes four columns into 80 and cuts names mid-word).
    width = max(len(label) for _, label in cats + (("", "hooks"),))
    for name, dist in sorted(reg.plugins.items()):
        out.print(f"[bold]{name}[/bold]  {dist or f'accelc {__version__} (built-in)'}", highlight=False)
        hooks = ", ".join(h.removeprefix("accelc_") for h in sorted(reg.hooks.get(name, [])))
        rows = [("hooks", hooks or "-")]
        for cat, label in cats:
            owned = sorted(n for (c, n), p in reg.origin.items() if c == cat and p == name)
            if owned:
                rows.append((label, ", ".join(owned)))
        grid = Table.grid(padding=(0, 1))
        grid.add_column(width=width + 2, no_wrap=True, style="dim")
        grid.add_column(overflow="fold")
        for label, text in rows:
            grid.add_row(f"  {label}", text)
        out.print(grid)
        out.print()


@main.group()
def cache() -> None:
    """Inspect and maintain the artifact store."""


def _store(cache_dir: Path | None) -> Any:
    from .cache import Store, default_root

    return Store(cache_dir or default_root())


@cache.command("list")
@_cache_opt
def cache_list(cache_dir: Path | None) -> None:
    """List entries, most recently used first."""
    store = _store(cache_dir)
    # no borders and a short date: key, node, kind and size fit 80 columns without cutting a name
    t = Table(title=f"cache: {escape(str(store.root))}", box=None, pad_edge=False, title_justify="left")
    for col in ("key", "node", "kind", "MiB", "created"):
        t.add_column(col, justify="right" if col == "MiB" else "left")
    import time as _t

    total = 0
    for e in store.list():
        total += e.size_bytes
        t.add_row(
            e.key[:12],
            escape(str(e.meta.get("node", "?"))),  # verify[quantize] is not rich markup
            escape(str(e.meta.get("kind", "?"))),
            f"{e.size_bytes / 2**20:.2f}",
            _t.strftime("%m-%d %H:%M", _t.localtime(e.meta.get("created", 0))),
        )
    out.print(t)
    out.print(f"{len(store.list())} entries, {total / 2**20:.1f} MiB")


@cache.command("clear")
@_cache_opt
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def cache_clear(cache_dir: Path | None, yes: bool) -> None:
    """Remove every entry."""
    store = _store(cache_dir)
    if not yes and sys.stdin.isatty():
        click.confirm(f"Remove every entry under {store.root}?", abort=True)
    out.print(f"removed {store.clear()} entries")


@cache.command("verify")
@_cache_opt
@_cache_url_opt
@click.option("--remote", is_flag=True, help="Verify the remote cache (--cache-url) instead of the local one.")
def cache_verify(cache_dir: Path | None, cache_url: str | None, remote: bool) -> None:
    """Re-hash every entry; exit 6 if any is corrupt (a build would rebuild it)."""
    if remote:
        _remote_verify(cache_url)
        return
    store = _store(cache_dir)
    bad = store.verify_all()
    for key, problem in bad:
        out.print(f"[red]corrupt[/] {key[:12]}: {problem}")
    out.print(f"{len(store.list())} entries checked, {len(bad)} corrupt")
    if bad:
        sys.exit(6)


@cache.command("gc")
@_cache_opt
@click.option(
    "--max-size",
    "max_mib",
    type=str,
    envvar="ACCELC_CACHE_MAX_MIB",
    help="Keep at most this many MiB (env ACCELC_CACHE_MAX_MIB, which builds also honour).",
)
def cache_gc(cache_dir: Path | None, max_mib: str | None) -> None:
    """Remove what killed builds left behind, then evict least-recently-used entries until the
    store fits in --max-size MiB. A build's use of an entry (cache hit or read) counts; listing
    and verifying do not."""
    from .cache import SizeLimitError, parse_size_mib

    if max_mib is None or not max_mib.strip():
        raise click.UsageError("give --max-size MIB or set ACCELC_CACHE_MAX_MIB")
    try:
        max_bytes = parse_size_mib(max_mib.strip(), "--max-size")
    except SizeLimitError as e:
        raise click.BadParameter(str(e), param_hint="--max-size / ACCELC_CACHE_MAX_MIB") from e
    store = _store(cache_dir)
    swept = store.sweep()
    before = store.total_bytes()
    evicted = store.gc(max_bytes)
    after = store.total_bytes()
    if swept:
        out.print(f"removed {len(swept)} leftovers of interrupted builds or unreadable entries")
    out.print(
        f"evicted {len(evicted)} entries, {(before - after) / 2**20:.2f} MiB; "
        f"{len(store.list())} entries, {after / 2**20:.2f} MiB left"
    )


# -- remote cache commands (accelc.remote) ---------------------------------------------------------
def _remote(cache_url: str | None) -> Any:
    from .remote import RemoteStore

    if not cache_url:
        raise click.UsageError("give --cache-url URL or set ACCELC_CACHE_URL")
    return RemoteStore(cache_url)


def _remote_verify(cache_url: str | None) -> None:
    from .remote import display_url

    remote = _remote(cache_url)
    checked, problems = remote.verify()
    for p in problems:
        out.print(f"[red]corrupt[/] {p.key[:12]}: {escape(p.problem)}", soft_wrap=True)
    out.print(
        f"{checked} remote entries checked at {escape(display_url(remote.url))}, {len(problems)} corrupt",
        soft_wrap=True,
    )
    if problems:
        sys.exit(6)


@cache.command("push")
@_cache_opt
@_cache_url_opt
@click.option("--remote", is_flag=True, default=True, hidden=True, help="Accepted for symmetry with verify.")
def cache_push(cache_dir: Path | None, cache_url: str | None, remote: bool) -> None:
    """Upload every local entry the remote cache (--cache-url) lacks; each is re-hashed first."""
    from .errors import CorruptEntryError

    rs, store = _remote(cache_url), _store(cache_dir)
    sent = bad = 0
    for e in store.list():
        try:
            sent += rs.push(e.key, store)
        except CorruptEntryError as err:
            bad += 1
            out.print(f"[red]corrupt[/] {e.key[:12]}: {escape(str(err))} (not uploaded)", soft_wrap=True)
    out.print(f"uploaded {sent} entries, {bad} corrupt local entries skipped")
    if bad:
        sys.exit(6)


@cache.command("pull")
@_cache_opt
@_cache_url_opt
@click.option("--remote", is_flag=True, default=True, hidden=True, help="Accepted for symmetry with verify.")
def cache_pull(cache_dir: Path | None, cache_url: str | None, remote: bool) -> None:
    """Download every remote entry the local cache lacks; each is checked against its digests."""
    from .errors import CorruptEntryError

    rs, store = _remote(cache_url), _store(cache_dir)
    got = bad = 0
    for key in rs.keys():
        if store.lookup(key) is not None:
            continue
        try:
            got += rs.fetch(key, store) is not None
        except CorruptEntryError as err:
            bad += 1
            out.print(f"[red]refused[/] {key[:12]}: {escape(str(err))}", soft_wrap=True)
    out.print(f"downloaded {got} entries, {bad} refused")
    if bad:
        sys.exit(6)


@main.command()
@click.option(
    "--file",
    "env_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Pins to compare with (default: ./environment.yml, else the one next to accelc's sources).",
)
@click.option("--strict", is_flag=True, help="Exit 1 when an installed version differs from its pin or is missing.")
def env(env_file: Path | None, strict: bool) -> None:
    """Print the environment fingerprint a build records (Python, platform, package versions,
    host) as JSON, and report drift from environment.yml's pins on stderr."""
    from .environment import (
        drift,
        find_environment_file,
        fingerprint,
        fingerprint_digest,
        normalize_name,
        pin_roles,
        read_pins,
    )
    from .host import Host

    fp = fingerprint()
    doc: dict[str, Any] = {**fp, "fingerprint": fingerprint_digest(fp), "host": Host().describe()}
    path, looked = find_environment_file(env_file)
    if path is None:
        doc["environment_file"] = None
        out.print_json(json.dumps(doc))
        console.print(
            f"[yellow]no environment.yml found[/] (looked at {escape(', '.join(map(str, looked)))}); drift not checked"
        )
        if strict:
            raise AccelcError("--strict: no environment.yml to compare with")
        return
    try:
        rows = drift(read_pins(path))
    except ValueError as e:
        raise AccelcError(str(e)) from e
    # Runtime pins change what a build produces; test and tool pins (pytest, ruff, moto) do not. A pin
    # accelc does not declare at all counts as runtime (the environment file says it matters).
    roles = pin_roles(path)
    for r in rows:
        r["role"] = "runtime" if r["source"] == "conda" else roles.get(normalize_name(r["name"]), "runtime")
    drifting = [r for r in rows if r["status"] in ("differs", "missing")]
    bad = [r for r in drifting if r["role"] == "runtime"]
    other = [r for r in drifting if r["role"] != "runtime"]
    runtime_pins = sum(r["role"] == "runtime" for r in rows)
    doc["environment_file"] = {
        "path": str(path),
        "pins": len(rows),
        "runtime_pins": runtime_pins,
        "drift": bad,
        "drift_not_runtime": other,
        "unchecked": [r["name"] for r in rows if r["status"] == "unchecked"],
    }
    out.print_json(json.dumps(doc))

    def show(items: list[dict[str, Any]]) -> None:
        for r in items:
            have = r["installed"] or "not installed"
            console.print(f"  {escape(r['name'])}: pinned {escape(r['pinned'])}, installed {escape(have)}")

    if bad:
        console.print(
            f"[yellow]{len(bad)} of {runtime_pins} pins builds depend on (runtime) in {escape(str(path))} drift:[/]"
        )
        show(bad)
    else:
        console.print(f"[green]no drift[/] in the runtime pins: {runtime_pins} in {escape(str(path))} match")
    if other:
        groups = ", ".join(sorted({r["role"] for r in other}))
        console.print(
            f"[dim]{len(other)} test/tool-only pins ({escape(groups)}) differ; builds do not depend on them:[/]"
        )
        show(other)
    if bad and strict:
        raise AccelcError(f"the environment drifts from {path} ({len(bad)} runtime pin(s))")


if __name__ == "__main__":  # pragma: no cover
    main()
