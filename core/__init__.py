"""Squeeze Studio's quantization engine (SqueezeLLM dense-and-sparse), free of Qt.

Import the submodules you need (``core.quantize``, ``core.models``...); importing
``core`` itself stays cheap and never initialises CUDA.
"""

__version__ = "0.1.0"
