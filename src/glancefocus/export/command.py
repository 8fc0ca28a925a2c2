"""`glancefocus export CKPT OUT_DIR --format onnx`: the step graphs and manifest.json for the
early-exit runtime (glancefocus_runtime, `glancefocus predict --exported OUT_DIR`)."""
from __future__ import annotations

from ..cli import HelpFormatter


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a checkpoint to ONNX step graphs for the PyTorch-free runtime",
        description="Write OUT_DIR/glance.onnx, the focus step graph(s) and manifest.json "
                    "(preprocessing, P, T, class names, MACs per step, the calibrated exit "
                    "curve). Each graph has a dynamic batch axis and is checked with "
                    "onnx.checker and against PyTorch before it is kept. Run the result with "
                    "`glancefocus predict IMAGE... --exported OUT_DIR` (no PyTorch needed).",
        formatter_class=HelpFormatter)
    p.add_argument("checkpoint", metavar="CKPT",
                   help="a glancefocus checkpoint (.pt), or a static baseline's (the demo's "
                        "static.pt: exported as a one-step model without exits)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the folder to write (created if needed)")
    p.add_argument("--format", choices=("onnx",), default="onnx", help="the export format")
    p.add_argument("--image-size", type=int, default=None, metavar="PIXELS",
                   help="side of the square input the graphs take (default: the checkpoint's "
                        "data.image_size, what `glancefocus predict` feeds the model)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow unpickling an authors' *.pth.tar (only for files you trust)")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    from ..checkpoint import load_checkpoint
    from .static import export_static_onnx, is_static_checkpoint, load_static
    from .writer import export_onnx

    static = is_static_checkpoint(args.checkpoint)
    if static is not None:
        backbone, model_config, data, names = load_static(static, f"'{args.checkpoint}'")
        manifest = export_static_onnx(backbone, data, model_config.in_chans, args.out_dir,
                                      model_config.arch, names, source=str(args.checkpoint),
                                      image_size=args.image_size)
    else:
        model = load_checkpoint(args.checkpoint, trust_pickle=args.trust_pickle)
        manifest = export_onnx(model, args.out_dir, image_size=args.image_size,
                               source=str(args.checkpoint))
    graphs = sorted({step["graph"] for step in manifest["steps"]})
    curve = "with" if manifest["exit_curve"] else "without"
    size = manifest["input"]
    print(f"wrote {args.out_dir}: {', '.join(graphs)} and manifest.json ({manifest['exporter']} "
          f"exporter, opset {manifest['opset']}, input {size['channels']}x{size['height']}x"
          f"{size['width']}, {curve} calibrated exits; largest logit difference to PyTorch "
          f"{manifest['check']['max_abs_logit_difference']:.2g})")
    return 0
