"""Run a set of configs on ImageNet and write a markdown table of measured top-1 beside the
paper's number (scripts/paper_results.csv).

    python scripts/reproduce_tables.py DATA_ROOT CKPT_DIR [--configs deit_small_* ...]
        [--calib-num 32] [--output outputs/reproduce] [--device-target GPU]

CKPT_DIR holds one weight file per model, named after the model: <model>.ckpt,
.safetensors, .npz or .pth (e.g. deit_small_patch16_224.safetensors). Each config runs in its
own process (eval.py for *_fp configs, quant.py otherwise); a model's FP result is measured
once and reused (--fp-result). The table (OUTPUT/table.md) is rewritten after every run, so a
failure late in the set keeps the rows before it; a failed config is listed with its error.
"""
import argparse
import csv
import fnmatch
import glob
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from src.api import atomic_write_text, load_yaml  # noqa: E402

WEIGHT_EXTS = (".ckpt", ".safetensors", ".npz", ".pth")


def paper_numbers():
    with open(os.path.join(REPO, "scripts", "paper_results.csv"), encoding="utf-8") as f:
        return {r["config"]: r for r in csv.DictReader(f)}


def find_weights(ckpt_dir, model):
    for ext in WEIGHT_EXTS:
        p = os.path.join(ckpt_dir, model + ext)
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"{ckpt_dir}: no weights for {model} (expected {model}" + "{" + ",".join(WEIGHT_EXTS) + "})")


def select_configs(patterns):
    paper = paper_numbers()
    names = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(REPO, "configs", "*.yaml")))
    names = [n for n in names if not n.startswith("deit_fmnist")]
    if patterns:
        names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]
    else:
        names = [n for n in names if n in paper]
    if not names:
        raise ValueError(f"no config matches {patterns}")
    # FP configs first, so their results are reused by the quantized runs of the same model
    return sorted(names, key=lambda n: (not n.endswith("_fp"), n))


def table(rows):
    out = ["| config | paper top-1 | measured top-1 | measured - paper | FP top-1 | size MB | calib s | note |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def f(key, fmt="{:.2f}"):
            return fmt.format(r[key]) if r.get(key) is not None else ""
        delta = (r["top1"] - r["paper"]) if r.get("top1") is not None and r.get("paper") is not None else None
        out.append(f"| {r['config']} | {f('paper')} | {f('top1')} | {'' if delta is None else f'{delta:+.2f}'} | "
                   f"{f('fp_top1')} | {f('model_size_mb')} | {f('calib_seconds', '{:.0f}')} | {r.get('note', '')} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_root")
    p.add_argument("ckpt_dir")
    p.add_argument("--configs", nargs="*", help="config names or shell patterns (default: every paper row)")
    p.add_argument("--calib-num", type=int, help="override calib_num (e.g. 32)")
    p.add_argument("--output", default=os.path.join("outputs", "reproduce"))
    p.add_argument("--device-target", default="CPU", choices=("CPU", "GPU", "Ascend"))
    args = p.parse_args(argv)
    for path, what in ((args.data_root, "data root"), (args.ckpt_dir, "checkpoint folder")):
        if not os.path.isdir(path):
            print(f"error: {path}: {what} not found", file=sys.stderr)
            return 2
    try:
        names = select_configs(args.configs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paper = paper_numbers()
    os.makedirs(args.output, exist_ok=True)
    rows, fp_results = [], {}
    for name in names:
        cfg_path = os.path.join(REPO, "configs", name + ".yaml")
        cfg = load_yaml(cfg_path)
        row = {"config": name, "paper": float(paper[name]["paper_top1"]) if paper.get(name, {}).get("paper_top1") else None}
        rows.append(row)
        out = os.path.join(args.output, name)
        try:
            ckpt = find_weights(args.ckpt_dir, cfg["model"])
        except FileNotFoundError as e:
            row["note"] = str(e)
            atomic_write_text(os.path.join(args.output, "table.md"), table(rows))
            continue
        is_quant = "method" in cfg
        cmd = [sys.executable, os.path.join(REPO, "quant.py" if is_quant else "eval.py"), "--config", cfg_path,
               "--data", args.data_root, "--ckpt", ckpt, "--output", out, "--device-target", args.device_target]
        if is_quant and args.calib_num:
            cmd += ["--calib-num", str(args.calib_num)]
        if is_quant and cfg["model"] in fp_results:
            cmd += ["--fp-result", fp_results[cfg["model"]]]
        print("running: " + " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, cwd=REPO)
        result_path = os.path.join(out, "result.json")
        if proc.returncode != 0 or not os.path.isfile(result_path):
            row["note"] = f"failed (exit {proc.returncode}); see the log above"
        else:
            with open(result_path, encoding="utf-8") as f:
                res = json.load(f)
            row.update({k: res.get(k) for k in ("top1", "fp_top1", "model_size_mb", "calib_seconds")})
            if not is_quant:
                fp_results[cfg["model"]] = result_path
                row["fp_top1"] = res["top1"]
        atomic_write_text(os.path.join(args.output, "table.md"), table(rows))
    print(table(rows))
    print(f"table written to {os.path.join(args.output, 'table.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
