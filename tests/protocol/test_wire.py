"""Wire encoding against the spec's byte examples, and the sans-I/O server's event decoding."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guixsvc.protocol.ops import WORKER_MAGIC_1, Op
from guixsvc.protocol.server import NEED_DATA, Handshake, Request, ServerConnection
from guixsvc.protocol.wire import (
    Incomplete,
    ProtocolError,
    WireReader,
    encode_int,
    encode_string,
    encode_strings,
)
from guixsvc.store.paths import StoreDir

STORE = StoreDir("/gnu/store")
ITEM = "/gnu/store/26b8xvbkhrfwsi2kbr0yk5symm00w4b7-hello"


def test_string_example_from_spec() -> None:
    assert encode_string("abc").hex() == "03000000000000006162630000000000"
    assert encode_string(b"").hex() == "0000000000000000"
    assert len(encode_string(b"12345678")) == 16


def test_handshake_bytes_from_spec() -> None:
    conn = ServerConnection(STORE, version=0x163)
    conn.receive_data(bytes.fromhex("6378696e00000000"))
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send().hex() == "6f697864000000006301000000000000"
    conn.receive_data(bytes.fromhex("630100000000000000000000000000000100000000000000"))
    event = conn.next_event()
    assert event == Handshake(0x163, None, True)
    conn.last()
    assert conn.data_to_send().hex() == "73746c6100000000"


def test_bad_magic_is_a_protocol_error() -> None:
    conn = ServerConnection(STORE)
    conn.receive_data(b"GET / HTTP/1.1\r\n")
    with pytest.raises(ProtocolError, match="protocol mismatch"):
        conn.next_event()


def _ready() -> ServerConnection:
    conn = ServerConnection(STORE)
    conn.receive_data(
        encode_int(WORKER_MAGIC_1) + encode_int(0x163) + encode_int(0) + encode_int(1)
    )
    assert isinstance(conn.next_event(), Handshake)
    conn.data_to_send()
    return conn


def test_request_split_anywhere_decodes_the_same() -> None:
    request = encode_int(Op.ADD_TEXT_TO_STORE) + encode_string("foo") + encode_string(b"x" * 13)
    request += encode_strings([ITEM])
    for cut in range(len(request) + 1):
        conn = _ready()
        if cut:
            conn.receive_data(request[:cut])
        if cut < len(request):
            assert conn.next_event() is NEED_DATA
            conn.receive_data(request[cut:])
        event = conn.next_event()
        assert isinstance(event, Request)
        assert event.op == Op.ADD_TEXT_TO_STORE
        assert event.args[0] == "foo" and event.args[1] == b"x" * 13
        assert [STORE.display(p) for p in event.args[2]] == [ITEM]


def test_unknown_opcode_and_non_store_path() -> None:
    conn = _ready()
    conn.receive_data(encode_int(2))
    with pytest.raises(ProtocolError, match="invalid operation 2"):
        conn.next_event()
    conn = _ready()
    conn.receive_data(encode_int(Op.QUERY_PATH_INFO) + encode_string("/etc/passwd"))
    with pytest.raises(ProtocolError, match="path `/etc/passwd' is not in the store"):
        conn.next_event()


def test_integer_and_padding_checks() -> None:
    reader = WireReader()
    reader.feed(b"\0\0\0\0\1\0\0\0")
    with pytest.raises(ProtocolError, match="> 32-bit"):
        reader.read_int()
    reader = WireReader()
    reader.feed(encode_int(1) + b"a\0\0\0\0\0\0\1")
    with pytest.raises(ProtocolError, match="non-zero padding"):
        reader.read_bytes()
    reader = WireReader()
    reader.feed(encode_int(5) + b"abc")
    with pytest.raises(Incomplete):
        reader.read_bytes()


def test_error_status_only_for_new_clients() -> None:
    conn = _ready()
    conn.error("boom", 100)
    data = conn.data_to_send()
    assert data.endswith(encode_string("boom") + encode_int(100))


@given(st.lists(st.binary(max_size=40), max_size=8))
def test_strings_round_trip(items: list[bytes]) -> None:
    reader = WireReader()
    reader.feed(encode_strings(items))
    count = reader.read_int()
    assert [reader.read_bytes() for _ in range(count)] == items
    assert reader.available() == 0
