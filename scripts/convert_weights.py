"""Convert pretrained ViT/DeiT weights to a MindSpore checkpoint.

Builds the registered model NAME, loads FILE strictly (.safetensors, .npz in timm or
original Google ViT layout, .ckpt, or .pth/.pt/.bin when torch is installed) and writes its
parameters to OUT.ckpt (atomically: a temporary file renamed into place).

    python scripts/convert_weights.py --model deit_small_patch16_224 \\
        --input deit_small_patch16_224-cd65a155.safetensors --output deit_small.ckpt

Exit status 2 with a one-line `error: ...` on stderr when the input cannot be read or does
not match the model (missing/unexpected keys, shapes, number of classes).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="registered model name (e.g. deit_small_patch16_224)")
    p.add_argument("--input", required=True, help="weights to convert (.safetensors, .npz, .ckpt, .pth)")
    p.add_argument("--output", required=True, help="MindSpore checkpoint to write (.ckpt)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="number of classes of the model's head (default: the model's own)")
    p.add_argument("--drop-head", action="store_true",
                   help="do not load the checkpoint's classification head (keep a fresh one)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        if not args.output.lower().endswith(".ckpt"):
            raise ValueError(f"output '{args.output}' must end with .ckpt")
        from src.api import create_model, save_mindspore_checkpoint
        model = create_model(args.model, num_classes=args.num_classes, checkpoint=args.input,
                             drop_head=args.drop_head)
        save_mindspore_checkpoint(model, args.output)
    except (ValueError, OSError, ImportError, KeyError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    n = len(list(model.get_parameters()))
    head = " (head not loaded: freshly initialized)" if args.drop_head else ""
    print(f"wrote {args.output}: {n} parameters of {args.model} from {args.input}{head}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
