"""Shared fixtures: in-test plugins on the global plugin manager, and guards for its state.

The plugin manager (``facecore.core.plugins.pm``) is module-level, so a test that registers a
plugin must unregister it: ``register_plugin`` does that in ``finally``, and an autouse
guard fails any test that leaves a plugin behind (after removing it, so later tests are
unaffected).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest

from facecore.core import plugins


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    """The suite's models are tiny: one thread is as fast, and OpenMP threads spinning against
    the subprocesses some tests start (torchrun, CLI runs) can slow a step down 50-fold."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def register_plugin() -> Iterator[Callable[..., Any]]:
    """``register_plugin(obj, name=None) -> obj``: register on ``pm`` for this test only."""
    added: list[Any] = []

    def register(obj: Any, name: str | None = None) -> Any:
        plugins.pm.register(obj, name=name)
        added.append(obj)
        return obj

    try:
        yield register
    finally:
        for obj in reversed(added):
            if plugins.pm.is_registered(obj):
                plugins.pm.unregister(obj)


@pytest.fixture
def load_plugins_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str | None], None]]:
    """``load_plugins_env(value)``: set FACECORE_LOAD_PLUGINS (None: unset) and reload plugins.

    The variable and the loaded plugin set are restored after the test.
    """

    def set_env(value: str | None) -> None:
        if value is None:
            monkeypatch.delenv(plugins.LOAD_ENV, raising=False)
        else:
            monkeypatch.setenv(plugins.LOAD_ENV, value)
        plugins.reset()

    try:
        yield set_env
    finally:
        monkeypatch.undo()
        plugins.reset()


@pytest.fixture(autouse=True)
def _no_leaked_plugins() -> Iterator[None]:
    """Fail a test that leaves plugins registered on ``pm`` (and unregister them)."""
    before = {id(p) for _, p in plugins.registered_directly()}
    yield
    leaked = [(n, p) for n, p in plugins.registered_directly() if id(p) not in before]
    for _, obj in leaked:
        plugins.pm.unregister(obj)
    if leaked:
        pytest.fail(f"test left plugins registered on facecore.core.plugins.pm: {[n for n, _ in leaked]}")
