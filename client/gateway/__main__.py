from client.gateway.cli import app

app()
