"""Files out: ONNX export, onnxruntime sessions, runtime parity checks and TIDL deploy files."""
