"""Whether a lab service's port is taken: asked by binding on this machine, never by connecting out."""

from __future__ import annotations

import socket

import pytest

from appliance.lab.services import port_in_use

pytestmark = pytest.mark.unit


def test_a_listening_port_is_in_use_and_a_closed_one_is_not() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert port_in_use("127.0.0.1", port)
    assert not port_in_use("127.0.0.1", port)


def test_an_address_this_machine_does_not_have_yet_holds_nothing() -> None:
    """The lab bridge's admin address before `lab up` raises the bridge: a connect there would leave the machine
    (and a network that accepts every connection would answer it); nothing here can hold that port."""
    assert not port_in_use("198.51.100.251", 8200)  # TEST-NET-2: never an address of this machine
