"""The `pipeline` command line: a thin layer over the API in pipeline.run and friends."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from pipeline.core.errors import MeasurementError, PipelineError, first_line

try:  # typer carries its own copy of click from 0.2x on; before, its errors are click's
    from typer import TyperException as ArgumentError
except ImportError:  # pragma: no cover - older typer
    from click import ClickException as ArgumentError

app = typer.Typer(
    help="Prune and quantize a PyTorch model against latency measured on the target device.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)

TargetOpt = Annotated[
    str, typer.Option("--target", "-t", help="Target profile: a YAML path or a shipped name (cpu).")
]


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    """Global options."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING)


ShapeOpt = Annotated[
    str | None,
    typer.Option(help="The model's input, CxHxW (e.g. 3x224x224); default: the profile's."),
]
MaxDropOpt = Annotated[
    float | None,
    typer.Option(help="Points of accuracy the model may lose: search the fastest within."),
]

# The model and data options `run` and `analyze` share
ConfigOpt = Annotated[Path | None, typer.Option(help="Run config YAML (pipeline.yaml).")]
ModelOpt = Annotated[str | None, typer.Option(help="torchvision architecture or module:function.")]
WeightsOpt = Annotated[
    Path | None, typer.Option(help="Weights: .safetensors or a state_dict file.")
]
RandomInitOpt = Annotated[
    bool, typer.Option(help="Compress a torchvision --model from random weights, on purpose.")
]
DataOpt = Annotated[str | None, typer.Option(help="digits | imagefolder:DIR | module:function.")]
ClassesOpt = Annotated[int | None, typer.Option(help="Classes of --model.")]
SeedOpt = Annotated[int | None, typer.Option(help="Random seed.")]
ProgressOpt = Annotated[bool, typer.Option(help="Show progress bars.")]
StepsOpt = Annotated[int | None, typer.Option(help="Fine-tune steps of each search candidate.")]

# `pipeline run` options that override the run config's top level and its search section
RUN_OPTIONS = (
    "model",
    "weights",
    "random_init",
    "data",
    "num_classes",
    "policy",
    "budget_ms",
    "max_accuracy_drop",
    "out",
    "seed",
)
SEARCH_OPTIONS = ("agent", "episodes", "reward", "candidate_steps")
# Options whose default is not None: an option counts as given when it differs from these
FLAG_DEFAULTS = {"progress": True, "allow_over_budget": False, "random_init": False}


@app.command()
def run(
    target: TargetOpt,
    config: ConfigOpt = None,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    random_init: RandomInitOpt = False,
    data: DataOpt = None,
    num_classes: ClassesOpt = None,
    policy: Annotated[
        str | None, typer.Option(help="uniform:KEEP[:int8|fp16|fp32] or a policy JSON file.")
    ] = None,
    budget_ms: Annotated[float | None, typer.Option(help="Latency budget in ms.")] = None,
    max_accuracy_drop: MaxDropOpt = None,
    input_shape: ShapeOpt = None,
    finetune_steps: Annotated[
        int | None, typer.Option(help="Recovery fine-tune steps (default 300).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for run directories.")] = None,
    seed: SeedOpt = None,
    progress: ProgressOpt = True,
    agent: Annotated[
        str | None,
        typer.Option(help="Search agent: ppo, dqn, sac, td3, decore, n2n, uniform, random."),
    ] = None,
    episodes: Annotated[int | None, typer.Option(help="Candidates the search evaluates.")] = None,
    reward: Annotated[str | None, typer.Option(help="Reward: budget, amc, accuracy.")] = None,
    candidate_steps: StepsOpt = None,
    allow_over_budget: Annotated[
        bool, typer.Option(help="Ship the closest candidate when none meets the budget.")
    ] = False,
    resume: Annotated[
        Path | None, typer.Option(help="Continue an interrupted run in this run directory.")
    ] = None,
) -> None:
    """Compress a model for a target; with no --model it runs the embedded digits demo.

    Without --policy, an agent searches per-layer keep ratios and precisions against latency
    measured on the target: the most accurate under --budget-ms (default: 0.6 x the original's
    latency in its fastest precision, e.g. INT8), or with --max-accuracy-drop the fastest
    within that drop (with both, the fastest within the drop that also meets the budget).
    """
    # the options by name; each is a RunConfig field of the same name
    raise typer.Exit(_run(dict(locals())))


def _run(given: dict[str, Any]) -> int:
    """`pipeline run` with its options by name; the exit code."""
    from pipeline.core.config import load_config, resume_config
    from pipeline.core.profile import load_profile, parse_shape
    from pipeline.run import execute

    named = _given_options(given)
    prof = load_profile(given["target"])
    if given["resume"] is not None:
        _refuse_with("--resume", named - {"--target", "--resume", "--no-progress"})
        cfg = resume_config(given["resume"])
        cfg = cfg if given["progress"] else cfg.model_copy(update={"show_progress": False})
        return execute(prof, cfg, run_dir=given["resume"], resume=True)
    overrides = {k: given[k] for k in RUN_OPTIONS}
    overrides["show_progress"] = None if given["progress"] else False
    overrides["random_init"] = True if given["random_init"] else None
    overrides["input_shape"] = parse_shape(given["input_shape"]) if given["input_shape"] else None
    search = {k: given[k] for k in SEARCH_OPTIONS}
    search["allow_over_budget"] = True if given["allow_over_budget"] else None
    sections = {"search": search, "finetune": {"steps": given["finetune_steps"]}}
    cfg = load_config(given["config"], overrides, sections)
    if cfg.policy is not None:  # a fixed policy skips the search: its options would do nothing
        searching = {"--agent", "--episodes", "--reward", "--candidate-steps"}
        _refuse_with("--policy", named & (searching | {"--allow-over-budget"}))
    return execute(prof, cfg)


def _given_options(given: dict[str, object]) -> set[str]:
    """The `run` options the user gave, as spelt on the command line."""
    names = set()
    for key, value in given.items():
        if value is not None and value != FLAG_DEFAULTS.get(key):
            flag = "--no-progress" if key == "progress" else f"--{key.replace('_', '-')}"
            names.add(flag)
    return names


def _refuse_with(option: str, others: set[str]) -> None:
    """Options that would be ignored beside `option` are an error, not silently dropped."""
    if others:
        from pipeline.core.errors import ConfigError

        why = {
            "--resume": "a resumed run continues with the settings it started with",
            "--policy": "a fixed policy skips the search",
        }[option]
        raise ConfigError(f"{', '.join(sorted(others))} does not apply with {option}: {why}")


@app.command()
def bench(
    target: TargetOpt,
    artifact: Annotated[
        Path, typer.Argument(help="An .onnx or .engine file, or a run directory (both models).")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    timeout_s: Annotated[
        float,
        typer.Option(
            min=1,
            max=86_400,
            help="Each measurement (one model, one round) is stopped after this many seconds.",
        ),
    ] = 600,
    input_shape: ShapeOpt = None,
    batch: Annotated[
        str | None,
        typer.Option(help="Batch sizes, e.g. 1,8,32: each measured, in interleaved rounds."),
    ] = None,
) -> None:
    """Measure an artifact's latency on the target: warm-up, then timed runs. The input shape
    is --input-shape, else the ONNX graph's when static, else the profile's."""
    from pipeline.core.profile import load_profile, parse_shape, with_input_shape
    from pipeline.measure.batches import parse_batches
    from pipeline.measure.bench import graph_input_shape
    from pipeline.measure.bench_command import bench_command

    given = parse_shape(input_shape) if input_shape else None
    batches = parse_batches(batch) if batch is not None else None
    graph = artifact / "model.onnx" if artifact.is_dir() else artifact
    profile = with_input_shape(load_profile(target), given or graph_input_shape(graph))
    result, table = bench_command(profile, artifact, timeout_s, batches)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        console.print(table)


@app.command()
def analyze(
    target: TargetOpt,
    config: ConfigOpt = None,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    random_init: RandomInitOpt = False,
    data: DataOpt = None,
    num_classes: ClassesOpt = None,
    input_shape: ShapeOpt = None,
    keep_ratios: Annotated[
        str, typer.Option(help="Keep ratios each group is pruned to, alone.")
    ] = "0.25,0.5,0.75",
    candidate_steps: StepsOpt = None,
    out: Annotated[Path | None, typer.Option(help="Folder the analysis is written to.")] = None,
    seed: SeedOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Per prunable group: its measured share of the latency, and the candidate score and
    latency when it alone is pruned; per layer: the accuracy change with it alone in INT8.
    With no --model it analyses the embedded digits demo."""
    from pipeline.run.analyze import analyze_command

    analyze_command(dict(locals()))


@app.command()
def validate(
    target: TargetOpt,
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
) -> None:
    """Re-run the comparator on a run's model.onnx against its original.onnx."""
    from pipeline.core.profile import load_profile
    from pipeline.run.validate import validate_run

    result = validate_run(load_profile(target), run_dir)
    verdict = "passed" if result["passed"] else "FAILED"
    error = result["max_abs_error"]  # None when the outputs hold NaN or inf
    console.print(
        f"validation {verdict}: top-1 agreement {result['top1_agreement']:.2%}, "
        f"max abs error {'n/a' if error is None else f'{error:.4g}'}"
    )
    for reason in result.get("reasons", []):
        console.print(f"  {reason}")
    raise typer.Exit(0 if result["passed"] else 1)


@app.command()
def profiles() -> None:
    """List the shipped target profiles."""
    from rich.table import Table

    from pipeline.core.profile import load_profile, shipped_profiles

    table = Table(title="shipped target profiles")
    for col in ("name", "runtime", "device", "precisions"):
        table.add_column(col, no_wrap=True)
    table.add_column("description")
    for path in shipped_profiles():
        p = load_profile(path)
        device = p.device if isinstance(p.device, str) else "agent"
        precisions = ",".join(x.value for x in p.precisions)
        table.add_row(p.name, p.runtime, device, precisions, p.description)
    console.print(table)


device_app = typer.Typer(help="The device agent that measures on the target.", no_args_is_help=True)
app.add_typer(device_app, name="device")


@device_app.command("serve")
def device_serve(
    token_file: Annotated[
        Path | None, typer.Option(help="File holding the bearer token clients must send.")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind (0.0.0.0: all).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8765,
    tls_cert: Annotated[Path | None, typer.Option(help="TLS certificate (PEM).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="TLS private key (PEM).")] = None,
    max_upload_mb: Annotated[float, typer.Option(help="Largest upload accepted, MiB.")] = 1024,
    job_timeout_s: Annotated[
        float, typer.Option(help="A job running longer is killed and reported.")
    ] = 600,
    work_dir: Annotated[
        Path | None, typer.Option(help="Job folders (default $PIPELINE_CACHE/device-jobs).")
    ] = None,
    max_work_mb: Annotated[
        float, typer.Option(help="Job folders above this total, MiB, are pruned, oldest first.")
    ] = 8192,
    max_connections: Annotated[int, typer.Option(help="Open connections at most.")] = 64,
    max_unauthenticated: Annotated[
        int, typer.Option(help="Connections yet to show the token; beyond, the oldest closes.")
    ] = 16,
    header_timeout_s: Annotated[
        float, typer.Option(help="A request's headers must arrive within this (else 408).")
    ] = 10,
    body_timeout_s: Annotated[
        float, typer.Option(help="An upload idle for this long is refused (408).")
    ] = 30,
    keep_alive_s: Annotated[
        int, typer.Option(help="An idle kept-alive connection closes after this.")
    ] = 5,
) -> None:
    """Run the device agent on the target: measures and runs models sent by `pipeline run`."""
    from pipeline.device.guard import ConnectionLimits
    from pipeline.device.serve import ServeOptions, serve

    limits = ConnectionLimits(
        max_connections=max_connections,
        max_unauthenticated=max_unauthenticated,
        header_timeout_s=header_timeout_s,
        body_timeout_s=body_timeout_s,
        keep_alive_s=keep_alive_s,
    )
    options = ServeOptions(max_upload_mb, job_timeout_s, work_dir, max_work_mb, limits)
    serve(host, port, token_file, tls_cert, tls_key, options)


def main() -> None:
    """Entry point: bad input is one line and exit code 2; --debug shows tracebacks."""
    debug = "--debug" in sys.argv[1:]
    try:
        # Not standalone: click's usage errors come here, to be printed as one line
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except ArgumentError as exc:  # click's usage errors: one line, not a box
        _argument_error(exc)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except PipelineError as exc:
        if debug:
            raise
        _fail("error", exc, exc.exit_code)
    except MeasurementError as exc:
        if debug:
            raise
        _fail("measurement failed", exc, 1)
    except KeyboardInterrupt:
        err_console.print("interrupted; the run directory is marked as not complete")
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        _fail("internal error", exc, 1, hint=" (rerun with --debug for the traceback)")


def _argument_error(exc: Exception) -> None:
    """A command line click could not parse: one line and exit 2 (the help when none given)."""
    ctx = getattr(exc, "ctx", None)
    if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
        typer.echo(ctx.get_help(), err=True)
        sys.exit(2)
    command = ctx.command_path if ctx is not None else "pipeline"
    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    code = getattr(exc, "exit_code", 2)
    _fail("error", RuntimeError(message), code, hint=f" (see `{command} --help`)")


def _fail(kind: str, exc: BaseException, code: int, hint: str = "") -> None:
    message = first_line(exc)
    err_console.print(f"[red]{kind}:[/] {escape(message)}{hint}", highlight=False, soft_wrap=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
