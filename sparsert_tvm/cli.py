"""The ``sparsert`` command line."""

from __future__ import annotations

import sys

import click

from . import build


def parse_target(name: str):
    import tvm

    if name == "auto":
        return build.default_target()
    if name == "llvm":
        return build.host_cpu_target()
    if name == "cuda":
        if tvm.cuda(0).exist:
            return tvm.target.Target(tvm.target.Target.from_device(tvm.cuda(0)), host=build.host_cpu_target())
        return tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host=build.host_cpu_target())
    raise click.BadParameter(f"unknown target {name!r}; use auto, cuda or llvm")


def load_onnx(path: str):
    """An ONNX file imported into Relax, or a one-line error."""
    import onnx
    from tvm.relax.frontend.onnx import from_onnx

    try:
        model = onnx.load(path)
    except Exception as error:  # noqa: BLE001 - any parse failure is the user's file
        raise click.ClickException(f"cannot read ONNX model {path}: {error}") from error
    try:
        return from_onnx(model, keep_params_in_input=False)
    except Exception as error:  # noqa: BLE001 - the frontend raises many kinds
        message = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise click.ClickException(f"TVM cannot import {path}: {message}") from error


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Unrolled sparse kernels for pruned models, on Apache TVM."""


@main.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--target", default="auto", show_default=True, help="auto, cuda or llvm")
@click.option("--density-threshold", type=float, default=None, help="rewrite weights at or below this density")
def inspect(model, target, density_threshold):
    """Show, per weight layer of an ONNX MODEL, what would become a sparse kernel and why."""
    from .passes import SparsifyWeights
    from .report import report_of

    mod = load_onnx(model)
    try:
        checked = SparsifyWeights(parse_target(target), density_threshold, dry_run=True)(mod)
    except ValueError as error:
        raise click.ClickException(str(error)) from error
    click.echo(report_of(checked).table(), nl=False)


if __name__ == "__main__":
    sys.exit(main())
