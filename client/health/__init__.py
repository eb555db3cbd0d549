"""swarm-health: the swarm's coverage of its models. `report` judges (pure), `gather` reads the swarm, `cli` shows.

Other products (the gateway's /health) use `report` and `gather`, never the command line.
"""
