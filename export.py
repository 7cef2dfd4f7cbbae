"""Export a quantized checkpoint (quantized.ckpt, written by quant.py) for deployment: a MindIR
file (MindSpore Lite / mindspore.load) or an integer ONNX graph (onnxruntime).

The MindIR graph is the quantized model's forward pass in quantized mode for a fixed input
shape (--batch-size images; eval.py --ckpt FILE.mindir evaluates it with any batch size).
The default output is next to the checkpoint, with its stem: OUTPUT/quantized.mindir or
OUTPUT/quantized.onnx. Prints the written file's size next to the quantized checkpoint's
size and the model size (quantized weights at their bit width, everything else 32 bits).

Examples:
  python quant.py --config configs/deit_fmnist_minmax_w4a4.yaml --output outputs/w4a4
  python export.py --ckpt outputs/w4a4/quantized.ckpt --format mindir
  python export.py --ckpt outputs/w4a4/quantized.ckpt --format onnx --output /tmp/deit_fmnist_w4a4.onnx
  python eval.py --ckpt outputs/w4a4/quantized.mindir          # evaluate the exported file
"""
import argparse
import os
import sys

os.environ.setdefault("GLOG_v", "3")  # MindSpore: warnings and errors only from its C++ side

from src.config import DEFAULTS, ArgumentParser, ConfigError, check_value  # noqa: E402

FORMATS = ("mindir", "onnx")
SUFFIX = {"mindir": ".mindir", "onnx": ".onnx"}


def build_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="quantized checkpoint written by quant.py (quantized.ckpt)")
    p.add_argument("--format", required=True, choices=FORMATS, help="output format")
    p.add_argument("--output", help="output file (default: next to the checkpoint, <stem>.mindir / <stem>.onnx)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None,
                   help=f"batch size of the exported graph (MindIR default {DEFAULTS['batch_size'][0]}, eval.py's "
                        "default; ONNX default: the exporter's)")
    p.add_argument("--device-target", dest="device_target", default="CPU", choices=("CPU", "GPU", "Ascend"),
                   help="MindSpore device used while exporting (default CPU)")
    return p


def file_size(path):
    """Bytes of a file, plus its `<stem>_variables/` folder for a split (> 1 GB) MindIR file."""
    total = os.path.getsize(path)
    if path.endswith(".mindir"):
        variables = path[:-len(".mindir")] + "_variables"
        for root, _, files in os.walk(variables):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def main(args):
    """Export per the parsed arguments; returns {output, format, bytes, checkpoint_bytes, model_size_mb}."""
    ckpt = args.ckpt
    if not os.path.isfile(ckpt):
        raise FileNotFoundError(f"{ckpt}: checkpoint not found")
    if args.batch_size is not None:
        check_value("batch_size", args.batch_size, "--batch-size")
    out = args.output or os.path.splitext(ckpt)[0] + SUFFIX[args.format]
    if args.format == "mindir" and not out.endswith(".mindir"):
        raise ConfigError(f"--output {out}: a MindIR file name must end with '.mindir'")
    if os.path.exists(out) and os.path.samefile(out, ckpt):
        raise ConfigError(f"--output {out} is the checkpoint itself")

    from src.engine import setup_context
    from src.utils import check_writable_file
    check_writable_file(out, "--output")
    from src.quant.convert import load_quantized_checkpoint, model_size_mb, read_quant_meta
    setup_context(args.device_target, "graph")
    found = read_quant_meta(ckpt)  # a file MindSpore cannot parse, or a bad quant_meta: one-line errors
    if found is None:
        raise ValueError(f"{ckpt}: not a quantized checkpoint; run quant.py first")
    model, meta = load_quantized_checkpoint(ckpt)
    size_mb = model_size_mb(model)
    extra = {k: meta[k] for k in ("method", "w_bits", "a_bits") if k in meta}
    if args.format == "mindir":
        from src.export.mindir import export_mindir
        batch = args.batch_size or DEFAULTS["batch_size"][0]
        export_mindir(model, out, batch, model_name=meta["model"], extra_meta=extra)
    else:
        from src.export.onnx import export_onnx
        export_onnx(model, out, batch_size=args.batch_size, model_name=meta["model"])
    if not os.path.isfile(out):
        raise ValueError(f"{out}: the {args.format} exporter wrote no file")
    from src.run_folder import record_in_run_folder
    # inside a run folder (quantized.ckpt's, the default): the export joins the run's manifest, so
    # that the next run into that folder replaces it with the rest
    record_in_run_folder(out, *([out[:-len(".mindir")] + "_variables"] if out.endswith(".mindir") else []))
    result = {"output": out, "format": args.format, "bytes": file_size(out),
              "checkpoint_bytes": os.path.getsize(ckpt), "model_size_mb": size_mb}
    print(f"wrote {out}: {result['bytes'] / 1e6:.3f} MB ({args.format}); quantized checkpoint {ckpt}: "
          f"{result['checkpoint_bytes'] / 1e6:.3f} MB; model size {size_mb:.3f} MB "
          f"({meta['model']}, {_bits_text(meta)})", flush=True)
    return result


def _bits_text(meta):
    if "w_bits" in meta and "a_bits" in meta:
        return f"W{meta['w_bits']}A{meta['a_bits']}"
    wbits = sorted({d["w"]["bits"] for d in meta["layers"].values() if "w" in d})
    return "weights " + "/".join(str(b) for b in wbits) + " bits"


def cli(argv=None):
    from src.utils import run_cli
    argv = sys.argv[1:] if argv is None else argv
    return run_cli(lambda: main(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(cli())
