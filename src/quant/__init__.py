"""Post-training quantization: quantizer maths, fake-quantized cells, calibration, search."""
from .convert import (QUANT_TABLE, quantize_model, quant_cells, set_quant_mode, model_size_mb, layer_report,
                      size_breakdown, stored_size_mb,
                      save_quantized_checkpoint, load_quantized_checkpoint, read_quant_meta)
from .calibrate import calibrate_model, METHODS, register_method
from . import vtptq  # noqa: F401  (registers the paper's method)
from . import vtptq_plus  # noqa: F401  (registers vtptq_plus)

__all__ = ["QUANT_TABLE", "quantize_model", "quant_cells", "set_quant_mode", "model_size_mb", "layer_report",
           "size_breakdown", "stored_size_mb",
           "save_quantized_checkpoint", "load_quantized_checkpoint", "read_quant_meta", "calibrate_model",
           "METHODS", "register_method"]
