"""The package layout's import rules (docs/architecture.md), checked on the source so a stray import fails CI."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCTS = ("client.gateway", "client.health", "client.chat")


def _imports(package: str) -> dict[str, set[str]]:
    """Every absolute module each module of `package` imports, by module name (`from a import b` counts a and a.b)."""
    found: dict[str, set[str]] = {}
    for file in sorted((ROOT / package.replace(".", "/")).rglob("*.py")):
        module = ".".join(file.relative_to(ROOT).with_suffix("").parts)
        names: set[str] = set()
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
        found[module] = names
    return found


def _violations(package: str, forbidden: tuple[str, ...], skip: tuple[str, ...] = ()) -> list[str]:
    """`module imports name` for every import of a forbidden package (or a module inside it)."""
    return sorted(f"{module} imports {name}" for module, names in _imports(package).items()
                  if not (skip and module.startswith(skip))
                  for name in names if any(name == f or name.startswith(f + ".") for f in forbidden))


@pytest.mark.parametrize("package, forbidden, skip", [
    ("swarm", ("peer", "client"), ()),  # shared: knows neither side
    ("peer", ("client",), ()),
    ("client", ("peer",), ()),
    ("client", PRODUCTS, PRODUCTS),  # the core client knows none of the products built on it
    ("client.health", ("client.gateway", "client.chat"), ()),
    ("client.chat", ("client.gateway", "client.health"), ()),
    ("client.gateway", ("client.health.cli",), ()),  # the gateway uses the health library, not its command
])
def test_imports_flow_one_way(package: str, forbidden: tuple[str, ...], skip: tuple[str, ...]) -> None:
    assert _violations(package, forbidden, skip) == []


def test_the_rules_see_a_violation() -> None:
    """The checker itself: the gateway does import the health library, so forbidding it must report it."""
    assert "client.gateway.served imports client.health.report" in _violations("client.gateway", ("client.health",))
