"""STUN / TURN server configuration (server/ice.py) and ``avatar client --ice-server``: parsing,
the browser's JSON form, the environment, aiortc's configuration, and clear errors."""
from __future__ import annotations

import json

import pytest
from aiortc import RTCPeerConnection
from aiortc.rtcconfiguration import RTCIceTransportPolicy

from engine.cli import main
from server.ice import (
    ICE_SERVERS_ENV,
    IceServer,
    ice_servers_from_env,
    ice_servers_from_json,
    parse_ice_servers,
    rtc_configuration,
)
from tests import aio


def test_urls_with_credentials_for_the_turn_ones():
    servers = parse_ice_servers(["stun:stun.example.org:19302", "turn:turn.example.org:3478?transport=tcp", "turns:turn.example.org"],
                                username="avatar", credential="s3cret")
    assert servers[0] == IceServer(("stun:stun.example.org:19302",))  # STUN takes no credentials
    assert all(s.username == "avatar" and s.credential == "s3cret" for s in servers[1:])
    assert [s.to_json() for s in servers] == [
        {"urls": ["stun:stun.example.org:19302"]},
        {"urls": ["turn:turn.example.org:3478?transport=tcp"], "username": "avatar", "credential": "s3cret"},
        {"urls": ["turns:turn.example.org"], "username": "avatar", "credential": "s3cret"},
    ]
    # the browser's form round-trips (what the page would be given)
    assert ice_servers_from_json(json.dumps([s.to_json() for s in servers])) == servers
    assert ice_servers_from_json(json.dumps({"iceServers": [{"urls": "stun:a.example"}]})) == [IceServer(("stun:a.example",))]


@pytest.mark.parametrize("url, message", [
    ("http://stun.example.org", "bad ICE server URL"),
    ("stun:", "bad ICE server URL"),
    ("turn:turn.example.org", "needs a username and a credential"),
])
def test_bad_servers_are_refused_with_the_reason(url, message):
    with pytest.raises(ValueError, match=message):
        parse_ice_servers([url])


def test_the_environment_holds_the_json_or_a_file_of_it(tmp_path):
    servers = [{"urls": ["stun:stun.example.org"]}, {"urls": "turn:t.example.org", "username": "u", "credential": "p"}]
    assert ice_servers_from_env({}) == [] and ice_servers_from_env({ICE_SERVERS_ENV: " "}) == []
    inline = ice_servers_from_env({ICE_SERVERS_ENV: json.dumps(servers)})
    f = tmp_path / "ice.json"
    f.write_text(json.dumps(servers))
    assert ice_servers_from_env({ICE_SERVERS_ENV: str(f)}) == inline
    assert inline[1] == IceServer(("turn:t.example.org",), "u", "p")
    with pytest.raises(ValueError, match=ICE_SERVERS_ENV):
        ice_servers_from_env({ICE_SERVERS_ENV: '[{"urls": "turn:t.example.org"}]'})


def test_aiortc_takes_the_configuration():
    servers = parse_ice_servers(["stun:127.0.0.1:3478", "turn:127.0.0.1:3478"], username="u", credential="p")
    cfg = rtc_configuration(servers)
    assert [s.urls for s in cfg.iceServers] == [["stun:127.0.0.1:3478"], ["turn:127.0.0.1:3478"]]
    assert cfg.iceTransportPolicy == RTCIceTransportPolicy.ALL
    assert rtc_configuration(servers, relay_only=True).iceTransportPolicy == RTCIceTransportPolicy.RELAY
    assert rtc_configuration().iceServers == []  # the default: host candidates only
    with pytest.raises(ValueError, match="needs a TURN server"):
        rtc_configuration(servers[:1], relay_only=True)

    async def make():
        pc = RTCPeerConnection(cfg)  # aiortc accepts it (its own URL parser agrees with ours)
        await pc.close()

    aio.run(make(), 10)


def test_avatar_client_refuses_a_bad_ice_server_before_connecting(capsys):
    assert main(["client", "--server", "http://127.0.0.1:9", "--ice-server", "turn:turn.example.org"]) == 2
    assert "needs a username and a credential" in capsys.readouterr().err
