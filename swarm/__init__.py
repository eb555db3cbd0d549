"""What peers and clients share: model references, spans, DHT records and the wire protocol."""

__version__ = "0.2.0"
