"""python -m qat.footprint --model NAME_OR_DIR | --params 70e9 [--group-size 64|channel] [--json PATH]
python -m qat.footprint --model DIR --recipe NAME [key=value ...]   (a run's memory, stage by stage)

Weight memory at FP32, BF16, INT8, INT4, INT3 and INT2: first the naive params * bits / 8, then the
bytes an export stores (bf16 scales per group, packed zero points when asymmetric, embeddings /
lm_head / norms in bf16). For an export directory, the measured tensor bytes beside the prediction.
GB = 1e9 bytes; GiB = 2^30 bytes.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from qat.eval.footprint import (GB, GIB, KINDS, NAIVE_FORMATS, ModelShapes, estimated_bits_per_weight,
                                export_footprint, model_bytes, model_shapes, naive_bytes, scheme_grid)
from qat.eval.tables import text_table


def _digits(largest_bytes: float) -> int:
    """Decimals that keep about four significant digits of the largest GB figure in a column."""
    return min(9, max(3, 3 - math.floor(math.log10(max(largest_bytes, 1.0) / GB))))


def naive_table(params: float) -> tuple[str, dict[str, float]]:
    values = {name: naive_bytes(params, bits) for name, bits in NAIVE_FORMATS}
    d = _digits(values["FP32"])
    rows = [(name, bits, f"{values[name] / GB:,.{d}f}", f"{values[name] / GIB:,.{d}f}")
            for name, bits in NAIVE_FORMATS]
    return text_table(("format", "bits", "GB", "GiB"), rows), values


def _vs(total: float, naive: float) -> str:
    return f"{100 * (total / naive - 1):+.1f}%"


def exact_table(shapes: ModelShapes, group_size: int | None) -> tuple[str, dict[str, dict]]:
    """Every scheme on the model's real layer shapes; FP32 / BF16 store every parameter alike."""
    n, lin = shapes.total_params, shapes.linear_params
    results = {name: {"bits_per_weight": bits, "linear_bytes": lin * bits // 8,
                      "other_bytes": (n - lin) * bits // 8, "total": n * bits // 8}
               for name, bits in NAIVE_FORMATS[:2]}
    for name, spec in scheme_grid(group_size):
        b = model_bytes(shapes, spec)
        linear = b["total"] - b["float"]
        results[name] = {"bits_per_weight": 8 * linear / lin, "linear_bytes": linear,
                         "other_bytes": b["float"], "total": b["total"], "naive_bits": spec.bits}
    d = _digits(results["FP32"]["total"])
    rows = [(name, f"{r['bits_per_weight']:.3f}", f"{r['linear_bytes'] / GB:,.{d}f}",
             f"{r['other_bytes'] / GB:,.{d}f}", f"{r['total'] / GB:,.{d}f}",
             f"{r['total'] / GIB:,.{d}f}",
             _vs(r["total"], naive_bytes(n, r.get("naive_bits", r["bits_per_weight"]))))
            for name, r in results.items()]
    headers = ("format", "bits/w", "Linears GB", "other GB", "total GB", "total GiB", "vs naive")
    return text_table(headers, rows), results


def estimate_table(params: float, group_size: int | None) -> tuple[str, dict[str, dict]]:
    """Without shapes: every parameter in a quantized Linear, nothing kept in float."""
    results = {}
    for name, spec in scheme_grid(group_size):
        bpw = estimated_bits_per_weight(spec)
        results[name] = {"bits_per_weight": bpw, "total": naive_bytes(params, bpw),
                         "naive_bits": spec.bits}
    d = _digits(naive_bytes(params, 8))
    rows = [(name, f"{r['bits_per_weight']:.3f}", f"{r['total'] / GB:,.{d}f}",
             f"{r['total'] / GIB:,.{d}f}", _vs(r["total"], naive_bytes(params, r["naive_bits"])))
            for name, r in results.items()]
    return text_table(("format", "bits/w", "GB", "GiB", "vs naive"), rows), results


def export_table(directory: Path) -> tuple[str, dict]:
    info = export_footprint(directory)
    measured, predicted = info["measured"], info["predicted"]
    rows = [(kind if kind != "float" else f"float ({info['float_dtype']})", f"{measured[kind]:,}",
             f"{predicted[kind]:,}", "yes" if measured[kind] == predicted[kind] else "NO")
            for kind in KINDS + ("total",)]
    text = text_table(("tensor kind", "measured bytes", "predicted bytes", "match"), rows)
    schemes = ", ".join(f"{n} x {s}" for s, n in info["schemes"].items())
    text += (f"\n{schemes}; model.safetensors is {info['file_bytes']:,} bytes "
             f"({info['file_bytes'] - measured['total']:,} of them header)")
    return text, info


def _group_size(text: str) -> int | None:
    if text in ("channel", "per-channel", "0"):
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("--group-size must be a positive integer or 'channel'")
    return value


def _is_export(source: str) -> bool:
    config = Path(source).expanduser() / "config.json"
    return config.is_file() and "quantization_config" in json.loads(config.read_text())


def report(model: str | None, params: float | None, group_size: int | None) -> tuple[str, dict]:
    """The printed text and the same numbers as a JSON-ready dict."""
    out: dict = {"group_size": group_size}
    parts = []
    if model is not None and _is_export(model):
        text, out["export"] = export_table(Path(model))
        return f"export {model}: measured tensor bytes vs prediction\n{text}", out
    label = f"g{group_size}" if group_size else "per-channel"
    if model is not None:
        shapes = model_shapes(model)
        params = shapes.total_params
        out.update(params=params, linear_params=shapes.linear_params)
        parts.append(f"{model}: {params / 1e6:,.1f}M parameters, {shapes.linear_params / 1e6:,.1f}M "
                     f"({100 * shapes.linear_params / params:.1f}%) in {len(shapes.linears)} "
                     "quantizable decoder Linears")
    naive, out["naive"] = naive_table(params)
    parts += [f"naive: params x bits / 8 ({params:,.0f} parameters)", naive]
    if model is not None:
        exact, out["exact"] = exact_table(shapes, group_size)
        parts += [f"\nexact, as exported: decoder Linears quantized ({label}, bf16 scales, packed "
                  "int32 zero points when asym); embeddings, lm_head and norms in bf16", exact]
    else:
        exact, out["estimate"] = estimate_table(params, group_size)
        parts += [f"\nestimate with scale / zero-point overhead ({label}), assuming every parameter "
                  "sits in a quantized Linear (pass --model for the real layer shapes)", exact]
    out["params"] = params
    return "\n".join(parts), out


def run_report(model: str, recipe: str, overrides: list[str]) -> tuple[str, dict]:
    """Each stage's peak host, device and disk bytes for `python train.py recipe=RECIPE
    model.path=MODEL OVERRIDES` (qat.footprint.run), from config.json alone."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    import qat
    from qat.eval.footprint import meta_model, model_config
    from qat.footprint.run import run_shape, stage_bytes
    from qat.models.experts import active_params
    from qat.format.shards import weight_files
    from qat.train.specs import build_specs
    from qat.train.steps import stage_device
    from qat.train.streamed import can_stream

    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model {model}: no config.json (--recipe needs a model dir)")
    conf = Path(qat.__file__).resolve().parent / "conf"
    try:
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = compose(config_name="train",
                          overrides=[f"recipe={recipe}", f"model.path={path}", *overrides])
    except HydraException as err:
        raise ValueError(f"--recipe {recipe} {' '.join(overrides)}: {err}") from err
    specs = build_specs(cfg)
    stage_device(specs, cfg)  # model.dtype=auto as this machine's run would make it
    skeleton = meta_model(model_config(str(path)))
    shape = run_shape(skeleton, specs.quant)
    total, active = active_params(skeleton)
    files = [f for f in weight_files(path) if f.is_file()]
    config = model_config(str(path))
    stored = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
                 or "float32").removeprefix("torch.")
    files_bytes = sum(f.stat().st_size for f in files) if files \
        else shape.params * {"float32": 4}.get(stored, 2)  # config alone: as its dtype says
    streamed = can_stream(specs, cfg.trainer.max_steps)
    stages = stage_bytes(shape, specs, streamed, files_bytes, cfg.trainer.max_steps != 0)
    rows = [(r["stage"], f"{r['host_bytes'] / GIB:,.2f}", f"{r['device_bytes'] / GIB:,.2f}",
             f"{r['disk_bytes'] / GIB:,.2f}") for r in stages]
    how = "streamed: blocks read from the files one at a time, held as codes" if streamed \
        else "the model loaded whole"
    moe = f" ({active / 1e9:.3f}B active per token: {2 * active / GIB:,.2f} of " \
        f"{2 * total / GIB:,.2f} GiB in bf16)" if active != total else ""
    text = (f"{model}, recipe={recipe} {' '.join(overrides)}: {shape.params / 1e9:.3f}B "
            f"parameters{moe}, {shape.blocks} blocks; {how}\n"
            + text_table(("stage", "host GiB", "device GiB", "disk GiB"), rows)
            + f"\npeak host {max(r['host_bytes'] for r in stages) / GIB:,.2f} GiB")
    return text, {"model": model, "recipe": recipe, "overrides": overrides,
                  "params": shape.params, "active_params": active,
                  "bf16_bytes": 2 * total, "active_bf16_bytes": 2 * active,
                  "streamed": streamed, "stages": stages}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qat-footprint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="HF model dir, export dir, builtin (smollm2-135m, tiny) or hub id")
    source.add_argument("--params", type=float, help="parameter count, e.g. 70e9")
    parser.add_argument("--group-size", type=_group_size, default=64,
                        help="weights per scale (default 64) or 'channel'")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    parser.add_argument("--recipe", help="predict a training run's peak memory and disk per stage "
                        "(with --model DIR; trailing key=value overrides as train.py takes them)")
    parser.add_argument("overrides", nargs="*", help="train.py overrides, with --recipe")
    args = parser.parse_args(argv)
    if args.params is not None and args.params <= 0:
        parser.error("--params must be positive")
    if args.overrides and args.recipe is None:
        parser.error("key=value overrides go with --recipe")
    if args.recipe is not None and args.model is None:
        parser.error("--recipe needs --model DIR")
    try:
        text, out = run_report(args.model, args.recipe, args.overrides) if args.recipe \
            else report(args.model, args.params, args.group_size)
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
