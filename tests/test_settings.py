"""Peer settings: flags > SWARM_* environment > YAML file > defaults."""
import pytest

from peer.settings import load_settings
from swarm.errors import SwarmError


def test_precedence(tmp_path, monkeypatch):
    config = tmp_path / "peer.yaml"
    config.write_text("blocks: '0:10'\npublic_name: from-file\nmax_cache_tokens: 100\nannounce_period: 7\n")
    monkeypatch.setenv("SWARM_PUBLIC_NAME", "from-env")
    monkeypatch.setenv("SWARM_MAX_CACHE_TOKENS", "200")
    monkeypatch.setenv("SWARM_INITIAL_PEERS", "/ip4/127.0.0.1/tcp/1/p2p/A, /ip4/127.0.0.1/tcp/2/p2p/B")
    monkeypatch.delenv("SWARM_DTYPE")  # pinned for the tests' swarms (conftest.py)
    settings = load_settings(config, {"max_cache_tokens": 300, "blocks": None})
    assert settings.span == (0, 10)  # file
    assert settings.announce_period == 7  # file
    assert settings.public_name == "from-env"  # env beats file
    assert settings.max_cache_tokens == 300  # flag beats env
    assert settings.initial_peers == ["/ip4/127.0.0.1/tcp/1/p2p/A", "/ip4/127.0.0.1/tcp/2/p2p/B"]
    assert settings.model == "smollm2-135m" and settings.device == "cpu"  # defaults
    assert settings.dtype is None and settings.quant == "none"  # measured on the machine (peer/precision.py)


@pytest.mark.parametrize(
    "flags, words",
    [
        ({"blocks": "3:3"}, "blocks"),
        ({"blocks": "1:2", "num_blocks": 3}, "not both"),
        ({"dtype": "float64"}, "dtype"),
        ({"quant": "int3"}, "quant"),
        ({"cache_dtype": "int8"}, "cache_dtype"),
        ({"device": "tpu"}, "device"),
        ({"new_swarm": True, "initial_peers": ["/ip4/127.0.0.1/tcp/1"]}, "not both"),
    ],
)
def test_bad_values_name_the_field(flags, words):
    with pytest.raises(SwarmError, match=words):
        load_settings(None, flags)


def test_bad_yaml(tmp_path):
    config = tmp_path / "peer.yaml"
    config.write_text("[unclosed")
    with pytest.raises(SwarmError, match="peer.yaml"):
        load_settings(config, {})


def test_every_flag_names_a_setting():
    """swarm-serve hands its flags to load_settings by name; two settings are YAML and env only (docs/operations.md)."""
    import inspect

    from peer.cli import serve
    from peer.settings import PeerSettings

    flags = set(inspect.signature(serve).parameters) - {"context", "config"}
    assert flags <= set(PeerSettings.model_fields)
    assert set(PeerSettings.model_fields) - flags == {"shutdown_grace", "rebalance_period"}
