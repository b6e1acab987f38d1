"""Exceptions raised at the library's boundaries; the CLI turns each into a
one-line message and exit code 2."""


class JaxllmError(Exception):
    """Base class: a problem with the user's input, explained in the message."""


class ModelFileError(JaxllmError):
    """A model file or folder is missing, truncated or not what it claims to be."""


class UnsupportedArchitectureError(JaxllmError):
    """The model's architecture is not one jaxllm implements."""


class UnsupportedTensorTypeError(JaxllmError):
    """A GGUF tensor uses a quantization type jaxllm cannot dequantize."""


class UnknownModelError(JaxllmError):
    """A model name that is neither a path nor a packaged model."""


class ContextLengthError(ValueError):
    """A prompt does not fit the model's (or the requested) context."""
