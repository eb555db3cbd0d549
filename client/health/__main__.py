from client.health.cli import app

app()
