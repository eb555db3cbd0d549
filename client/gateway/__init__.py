"""swarm-api: an OpenAI-compatible HTTP gateway to the swarm.

`cli` is the command, `served` the models it serves and their swarm checks, `app` the FastAPI app,
`openai_schema` the request and response bodies, `metrics` its Prometheus metrics.
"""
