"""The sd_notify client, twice: central's and the agent's copies stay the same code, and
it behaves as systemd expects (the real processes are in ``tests/e2e/test_systemd.py``)."""

from __future__ import annotations

import inspect
import secrets
import socket
from pathlib import Path

import pytest

import tillsync_agent.systemd as agent_systemd
import tillsync_central.systemd as central_systemd

COPIES = [agent_systemd, central_systemd]


def _code(module: object) -> str:
    """The module without its docstring (which names the other copy)."""
    source = inspect.getsource(module)
    return source.split('"""', 2)[2]


def test_the_two_copies_are_the_same_code() -> None:
    assert _code(agent_systemd) == _code(central_systemd)


@pytest.mark.parametrize("module", COPIES, ids=["agent", "central"])
def test_no_socket_means_no_op(module: object) -> None:
    notifier = module.Notifier.from_environment({}, 1234)
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert notifier.ready() is False


@pytest.mark.parametrize("module", COPIES, ids=["agent", "central"])
def test_datagrams_reach_a_path_and_an_abstract_socket(module: object, tmp_path: Path) -> None:
    for address in (str(tmp_path / "n.sock"), f"@tillsync-test-{secrets.token_hex(6)}"):
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        bound = b"\0" + address[1:].encode() if address.startswith("@") else address
        receiver.bind(bound)
        receiver.settimeout(5)
        try:
            env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "77"}
            notifier = module.Notifier.from_environment(env, 77)
            assert notifier.watchdog_interval == 15.0
            assert notifier.ready()
            assert notifier.watchdog()
            assert notifier.stopping()
            got = [receiver.recv(100) for _ in range(3)]
            assert got == [b"READY=1", b"WATCHDOG=1", b"STOPPING=1"]
            notifier.close()
        finally:
            receiver.close()


@pytest.mark.parametrize("module", COPIES, ids=["agent", "central"])
def test_watchdog_of_another_process_and_a_vanished_socket(module: object, tmp_path: Path) -> None:
    env = {"NOTIFY_SOCKET": str(tmp_path / "gone.sock"), "WATCHDOG_USEC": "30000000"}
    other = module.Notifier.from_environment({**env, "WATCHDOG_PID": "1"}, 2)
    assert other.watchdog_interval is None
    notifier = module.Notifier.from_environment(env, 2)
    # Nobody listens: reported as not sent, never raised.
    assert notifier.ready() is False
    assert notifier.watchdog() is False
