"""Errors a user can act on: every CLI prints them as one line instead of a traceback."""


class SwarmError(Exception):
    """Base class: the message alone tells the user what is wrong."""


class ModelReferenceError(SwarmError):
    """A model reference names nothing we can load."""


class WeightsError(SwarmError):
    """A weights file is missing, truncated or does not match its config."""


class SpanRangeError(SwarmError):
    """A block range lies outside the model."""


class ProtocolError(SwarmError):
    """A message broke the wire protocol; sent back to the caller as an error reply."""


class DeviceError(SwarmError):
    """The device asked for does not exist here, or cannot hold what was asked of it."""


class RouteError(SwarmError):
    """The swarm cannot serve some blocks of a model."""


class QuantizationError(SwarmError):
    """A quantization that this model's shapes or this device cannot run."""
