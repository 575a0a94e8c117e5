"""The ports are honest: RedisStore implements every method of the engine's Store protocol with
the same parameters, and the engine calls nothing on its store that the protocol does not list."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from quota_sidecar.domain import engine
from quota_sidecar.domain.ports import Store
from quota_sidecar.storage.store import RedisStore

PROTOCOL_METHODS = sorted(name for name, value in vars(Store).items()
                          if inspect.isfunction(value) and not name.startswith("_"))


def _parameters(function: object) -> list[tuple[str, inspect._ParameterKind]]:
    return [(p.name, p.kind) for p in inspect.signature(function).parameters.values()]  # type: ignore[arg-type]


def test_redis_store_implements_every_store_method_with_the_same_parameters() -> None:
    assert PROTOCOL_METHODS, "the protocol lists its methods"
    for name in PROTOCOL_METHODS:
        implementation = getattr(RedisStore, name, None)
        assert implementation is not None, f"RedisStore lacks {name}"
        assert inspect.iscoroutinefunction(implementation), f"RedisStore.{name} must be async like the protocol"
        wanted = _parameters(getattr(Store, name))
        # Extra keyword-only parameters with defaults are allowed (tuning knobs such as batch sizes).
        got = [(n, k) for n, k in _parameters(implementation)
               if not (k is inspect.Parameter.KEYWORD_ONLY and (n, k) not in wanted)]
        assert got == wanted, f"RedisStore.{name}{inspect.signature(implementation)} != Store.{name}"


def test_the_engine_calls_only_what_the_protocol_lists() -> None:
    tree = ast.parse(Path(inspect.getfile(engine)).read_text(encoding="utf-8"))
    called = {node.attr for node in ast.walk(tree)
              if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
              and node.value.attr == "store"}
    assert called, "the engine calls its store"
    assert called <= set(PROTOCOL_METHODS), f"not in the Store protocol: {sorted(called - set(PROTOCOL_METHODS))}"
    assert set(PROTOCOL_METHODS) <= called, f"listed but never called: {sorted(set(PROTOCOL_METHODS) - called)}"


def test_the_package_has_no_import_cycles() -> None:
    """Each module can be understood before the ones that import it (typing-only imports aside)."""
    import grimp

    graph = grimp.build_graph("quota_sidecar", exclude_type_checking_imports=True)
    modules = sorted(m for m in graph.modules if not m.startswith("quota_sidecar._proto"))
    cycles = sorted({tuple(sorted((a, b))) for a in modules for b in graph.find_modules_directly_imported_by(a)
                     if b.startswith("quota_sidecar") and graph.chain_exists(importer=b, imported=a)})
    assert cycles == [], cycles
