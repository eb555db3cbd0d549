"""The server: swarm-serve loads a span of blocks, announces it in the DHT and serves inference sessions."""
