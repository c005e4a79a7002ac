"""The ``sparsert`` command line: inspect, compile, run and prune models.

User errors (bad files, shapes, options) end with one line on stderr and a non-zero exit
status, never a traceback.
"""

from __future__ import annotations


import sys
from contextlib import contextmanager, nullcontext

import click

from . import build
from .errors import last_line


def parse_target(name: str):
    if name == "auto":
        return build.default_target()
    if name == "llvm":
        return build.host_cpu_target()
    if name == "cuda":
        return build.cuda_target()
    raise click.BadParameter(f"unknown target {name!r}; use auto, cuda or llvm", param_hint="--target")


def parse_input_shapes(values) -> dict | None:
    """``name:1x3x224x224`` options as from_onnx's shape_dict."""
    shapes = {}
    for value in values:
        name, sep, dims = value.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.split("x")]
        except ValueError:
            raise click.BadParameter(f"{value!r} is not NAME:D1xD2x...", param_hint="--input-shape") from None
    return shapes or None


def read_onnx(path: str):
    import onnx

    try:
        return onnx.load(path)
    except Exception as error:  # noqa: BLE001 - any parse failure is the user's file
        raise click.ClickException(f"cannot read ONNX model {path}: {error}") from error


def load_model(path: str, shapes: dict | None = None, batch: int | None = None):
    """An ONNX or TFLite (``.tflite``) file imported into Relax, or a one-line error.

    ``shapes`` fixes inputs' shapes by name; ``batch`` sets the first dimension of every other
    input whose remaining dimensions the file declares.
    """
    if path.endswith(".tflite"):
        import tflite
        from tvm.relax.frontend.tflite import from_tflite

        def read():
            return tflite.Model.GetRootAsModel(open(path, "rb").read(), 0)

        def declared(model):
            graph = model.Subgraphs(0)
            tensors = [graph.Tensors(int(i)) for i in graph.InputsAsNumpy()]
            return {t.Name().decode(): [int(d) for d in t.ShapeAsNumpy()] for t in tensors}

        def convert(model, shapes):
            return from_tflite(model, shape_dict=shapes)
    else:
        from tvm.relax.frontend.onnx import from_onnx

        def read():
            return read_onnx(path)

        def declared(model):
            weights = {init.name for init in model.graph.initializer}
            return {i.name: [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
                    for i in model.graph.input if i.name not in weights}

        def convert(model, shapes):
            return from_onnx(model, shape_dict=shapes, keep_params_in_input=False)

    try:
        model = read()
    except click.ClickException:
        raise
    except Exception as error:  # noqa: BLE001 - any parse failure is the user's file
        raise click.ClickException(f"cannot read {path}: {last_line(error)}") from error
    if batch is not None:
        shapes = {**with_batch(declared(model), batch), **(shapes or {})}
    try:
        return convert(model, shapes)
    except Exception as error:  # noqa: BLE001 - the frontends raise many kinds
        raise click.ClickException(f"TVM cannot import {path}: {last_line(error)}") from error


def with_batch(declared: dict, batch: int) -> dict:
    """The declared input shapes with ``batch`` as their first dimension, where the rest is static."""
    if batch < 1:
        raise click.BadParameter(f"{batch} is not a batch size", param_hint="--batch")
    return {name: [batch, *dims[1:]] for name, dims in declared.items()
            if dims and all(d is not None and d > 0 for d in dims[1:])}


@contextmanager
def user_errors():
    """Turns the library's expected failures into one-line CLI errors."""
    from .errors import SparseRTError

    try:
        yield
    except (SparseRTError, ValueError, TypeError) as error:
        raise click.ClickException(last_line(error)) from error


@contextmanager
def step(message: str):
    """A spinner on stderr while a long step runs."""
    from rich.console import Console

    with Console(stderr=True).status(message) as status:
        yield status


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Unrolled sparse kernels for pruned models, on Apache TVM."""


_BUILD_OPTIONS = (
    click.option("--target", default="auto", show_default=True, help="auto, cuda or llvm"),
    click.option(
        "--density-threshold", type=float, default=None,
        help="rewrite weights at or below this density [default: by layout]",
    ),
    click.option("--input-shape", multiple=True, metavar="NAME:1x3x224x224", help="fix an input's shape"),
    click.option("--batch", type=int, help="first dimension of every input (--input-shape wins where both apply)"),
    click.option(
        "--siblings-apart", is_flag=True,
        help="a kernel per layer where layers read one input (attention's query, key and value), not one for them all",
    ),
)


def build_options(command):
    """The options of every command that imports and rewrites MODEL (in this order in --help)."""
    for option in reversed(_BUILD_OPTIONS):
        command = option(command)
    return command


@main.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@build_options
def inspect(model, target, density_threshold, input_shape, batch, siblings_apart):
    """Show, per weight layer of an ONNX or TFLite MODEL, what would become a sparse kernel and why."""
    from .passes import SparsifyWeights
    from .report import report_of

    mod = load_model(model, parse_input_shapes(input_shape), batch)
    with user_errors():
        checked = SparsifyWeights(
            parse_target(target), density_threshold, dry_run=True, combine_siblings=not siblings_apart
        )(mod)
    click.echo(report_of(checked).table(), nl=False)


@main.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="the module to write (.so)")
@build_options
@click.option(
    "--tune", is_flag=True,
    help="autotune every sparse layer on this GPU (CUDA only; results kept in the tuning database)",
)
@click.option(
    "--tuning-db", type=click.Path(dir_okay=False),
    help="tuning database file (default: tuning.json in the kernel cache)",
)
def compile(model, output, target, density_threshold, input_shape, batch, siblings_apart, tune, tuning_db):  # noqa: A001
    """Compile an ONNX or TFLite MODEL with sparse kernels into a deployable module."""
    from .report import SparsityReport

    mod = load_model(model, parse_input_shapes(input_shape), batch)
    report = SparsityReport()
    resolved = parse_target(target)
    options = {"combine_siblings": not siblings_apart} | ({"tune": True} if tune else {})
    if tuning_db:
        options["tuning_database"] = tuning_db
    # Tuning shows a progress bar per layer; one live display at a time, so no spinner then.
    progress = nullcontext() if tune else step(f"compiling for {resolved.kind.name}")
    with user_errors(), progress:
        executable = build.compile(mod, resolved, density_threshold, report=report, **options)
        executable.export_library(output)
    click.echo(report.table(), nl=False)
    click.echo(f"wrote {output} ({resolved.kind.name})")


@main.command()
@click.argument("module", type=click.Path(exists=True, dir_okay=False))
@click.option("--input", "inputs", multiple=True, required=True, type=click.Path(exists=True, dir_okay=False),
              help="a .npy file per model input, in order")
@click.option("--output", type=click.Path(dir_okay=False), help="save the (first) output as .npy")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
def run(module, inputs, output, device):
    """Run a compiled MODULE (from `sparsert compile`) on .npy inputs."""
    import numpy as np
    import tvm
    from tvm import relax

    dev = tvm.cuda(0) if device == "cuda" or (device == "auto" and tvm.cuda(0).exist) else tvm.cpu(0)
    try:
        vm = relax.VirtualMachine(tvm.runtime.load_module(module), dev)
    except Exception as error:  # noqa: BLE001 - not a module, or built for another device
        raise click.ClickException(f"cannot load {module} on {dev}: {last_line(error)}") from error
    arrays = [np.load(path) for path in inputs]
    try:
        result = vm["main"](*[tvm.runtime.tensor(a, dev) for a in arrays])
    except Exception as error:  # noqa: BLE001 - wrong shapes / dtypes / counts
        raise click.ClickException(f"the model rejected its inputs: {last_line(error)}") from error
    first = result.numpy() if hasattr(result, "numpy") else result[0].numpy()
    summary = f"mean {first.mean():.6g}, max |x| {np.abs(first).max():.6g}"
    click.echo(f"output: shape {first.shape}, dtype {first.dtype}, {summary}")
    if output:
        np.save(output, first)


@main.command(name="bench")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@build_options
@click.option("--top", default=8, show_default=True, help="slowest calls listed per build")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write the figures as JSON")
@click.option("--plot", type=click.Path(dir_okay=False), help="write a PNG of the time split (needs matplotlib)")
def bench_command(model, target, density_threshold, input_shape, batch, siblings_apart, top, json_path, plot):
    """Time an ONNX or TFLite MODEL end to end, sparse against TVM's dense build (and onnxruntime
    where installed), with each build's kernel time split."""
    import dataclasses
    import json

    from . import bench

    if plot:
        with user_errors():
            bench.require_matplotlib()  # before minutes of building, not after
    mod = load_model(model, parse_input_shapes(input_shape), batch)
    inputs = random_inputs(mod)
    resolved = parse_target(target)
    with user_errors(), step(f"building and timing for {resolved.kind.name}") as status:
        result = bench.bench(
            mod, resolved, inputs, density_threshold, progress=status.update, combine_siblings=not siblings_apart
        )
        onnxruntime = None
        if not model.endswith(".tflite"):
            status.update("timing onnxruntime")
            onnxruntime = bench.onnxruntime_us(model, inputs, resolved)
    click.echo(result.report.summary())
    click.echo(bench.table(result, onnxruntime, top), nl=False)
    if json_path:
        us, note = onnxruntime or (None, "not applicable to TFLite files")
        figures = {"model": model, "target": resolved.kind.name, "inputs": [list(a.shape) for a in inputs],
                   "onnxruntime_us": us, "onnxruntime_note": note, "max_rel_error": result.max_rel_error,
                   "builds": [dataclasses.asdict(b) for b in (result.dense, result.sparse)]}
        with open(json_path, "w") as f:
            json.dump(figures, f, indent=1)
    if plot:
        with user_errors():
            bench.plot(result.dense, result.sparse, plot)


def random_inputs(mod) -> list:
    """Standard-normal inputs of the shapes and dtypes of ``main``'s parameters."""
    import numpy as np

    arrays = []
    for param in mod["main"].params:
        ty = param.ty
        try:
            dims = [int(d) for d in ty.shape.values]
        except (TypeError, AttributeError):
            raise click.UsageError(f"input {param.name!r} has a dynamic shape: give --input-shape "
                                   f"{param.name}:D1xD2...") from None
        arrays.append(np.random.default_rng(0).standard_normal(dims).astype(str(ty.dtype)))
    return arrays


@main.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--sparsity", type=float, required=True, help="fraction of each layer's weights to zero, e.g. 0.9")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False))
@click.option("--prune-first-conv/--keep-first-conv", default=False, show_default=True)
@click.option("--prune-depthwise/--keep-depthwise", default=False, show_default=True)
@click.option("--prune-classifier/--keep-classifier", default=True, show_default=True)
@click.option("--keep-scale", is_flag=True, help="scale each pruned layer back to its weight norm "
              "(for randomly initialised models, whose signal would otherwise fade with depth)")
def prune(model, sparsity, output, prune_first_conv, prune_depthwise, prune_classifier, keep_scale):
    """Magnitude-prune the Conv / ConvTranspose / Gemm / MatMul weights of an ONNX MODEL (unstructured)."""
    import onnx

    from .prune import prune_model

    with user_errors():
        pruned, layers = prune_model(
            read_onnx(model), sparsity, first_conv=prune_first_conv, depthwise=prune_depthwise,
            classifier=prune_classifier, keep_scale=keep_scale,
        )
    onnx.save(pruned, output)
    for layer in layers:
        note = "" if layer.pruned else f"  ({layer.why_not})"
        click.echo(f"{layer.op:7s} {layer.weight:30s} {str(layer.shape):20s} density {layer.density:.3f}{note}")
    click.echo(f"wrote {output}: {sum(layer.pruned for layer in layers)} of {len(layers)} layers pruned")


if __name__ == "__main__":
    sys.exit(main())
