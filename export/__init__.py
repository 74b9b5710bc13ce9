"""ONNX / TensorRT export per component (not yet implemented)."""
