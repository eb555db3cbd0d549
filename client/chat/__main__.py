from client.chat.cli import app

app()
