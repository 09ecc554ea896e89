"""hwnas: hardware-aware neural architecture search that exports verified ONNX models."""
__version__ = "0.1.0"
