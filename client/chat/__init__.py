"""swarm-chat: talk to the swarm from a terminal, one question or a whole conversation in one session."""
