"""Deployment formats of a quantized model: MindIR (src.export.mindir) and an integer ONNX
graph for onnxruntime (src.export.onnx). Each loader gives an object that eval.py evaluates
like a Cell: call it on a batch Tensor (B, C, H, W) for logits."""
