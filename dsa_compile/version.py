"""The package version (also written into every exported ONNX file)."""

__version__ = "0.1.0"
