"""The doorbell: msgpack messages that stand in for the hypercall instruction.

Every message is one msgpack array whose first element is its type. A guest vCPU
talks request/reply: it sends one message and blocks until the host answers::

    guest -> host   [HELLO, version, vcpu, pid]
    host -> guest   [WELCOME, version, {shm, mem_bytes, vcpu, queue_gpa, stack_gpa,
                                        pool_gpa, pool_bytes, host_limit, host_pid}]
    guest -> host   [HYPERCALL, vcpu, seq, nr, a0, a1, a2]     (the VM exit)
    host -> guest   [RETURN, seq, ret]                          (RAX on VM entry)
                    [RETURN, seq, ret, t_recv, t_applied, t_reply]  (host started with --phases:
                                                 CLOCK_MONOTONIC ns when it got the message,
                                                 finished applying it, sent the answer)
                    [RETURN, seq, ret, statuses]                (host started with --status)
                    [RETURN, seq, ret, t_recv, t_applied, t_reply, statuses]   (both)
    guest -> host   [BYE, vcpu]                                 (vCPU goes away)
    host -> guest   [RETURN, 0, 0]
    host -> any     [REJECT, seq or nil, reason]                (malformed message)

In ``ring`` mode (protocol.ring) two messages have no answer: the guest's
``[KICK, vcpu]`` wakes a host that set NEED_WAKEUP, and the host's
``[COMPLETE, vcpu, cons]`` wakes a guest that set WAITING. A guest then uses a
DEALER socket with the REQ envelope (an empty first frame), so it can both call
and be called.

For ``KVM_HC_MMU_OP`` the registers are ``a0 = len``, ``a1 = gpa & 0xffffffff``,
``a2 = gpa >> 32``; ``ret`` is the bytes the host processed or ``-KVM_E*``.
``statuses`` (msgpack bin, with --status) holds one signed byte per op the host
looked at, in order: 0 for each op applied, then ``-KVM_E*`` for the op it refused,
if it refused one (the patch's v1 reported each op's error code; the merged version
only the bytes processed). A walk stops at its first refusal, so only the last byte
can be nonzero; an op cut off at the end of the host's copy gets no status.
``seq`` counts a vCPU's hypercalls from 1, so the host can tell a lost or replayed
message from a new one.

The supervisor drives the host over the same socket with
``[CONTROL, token, command, args]`` answered by ``[CONTROL_REPLY, command, result]``;
the token is a secret the supervisor hands the host on its stdin.

Pure: encoding, decoding and validation only; the sockets are in the shells.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgpack

PROTOCOL_VERSION = 1

MSG_HELLO = 1
MSG_WELCOME = 2
MSG_HYPERCALL = 3
MSG_RETURN = 4
MSG_BYE = 5
MSG_REJECT = 6
MSG_CONTROL = 7
MSG_CONTROL_REPLY = 8
MSG_KICK = 9
MSG_COMPLETE = 10

# Nothing legitimate comes close; the host's socket refuses anything larger.
MAX_MESSAGE_BYTES = 4096
# A RETURN's statuses: one byte per op looked at, and an op is at least 8 bytes, so a host
# copying at most MAX_STATUS_HOST_LIMIT bytes per hypercall always fits its reply in a message.
MAX_STATUSES = 2048
MAX_STATUS_HOST_LIMIT = 8 * MAX_STATUSES


def status_limit_error(host_limit: int) -> str:
    return (f"--status sends one status byte per op, at most {MAX_STATUSES} in a reply: "
            f"a host limit of {host_limit} bytes needs {MAX_STATUS_HOST_LIMIT} or less")  # fmt: skip


# A REJECT's reason starts with one of these fixed categories (then ": detail");
# the host counts refused messages per category (control "stats": "rejected").
REJECT_MALFORMED = "malformed message"
REJECT_NOT_ATTACHED = "hypercall from a vCPU that has not said hello"
REJECT_SEQUENCE = "hypercall out of sequence"
REJECT_VERSION = "wrong protocol version"
REJECT_NO_VCPU = "no such vCPU"
REJECT_ATTACHED = "vCPU already attached"
REJECT_NO_PROCESS = "hello from a process that does not exist"
REJECT_BYE = "bye from a vCPU that is not attached"
REJECT_TOKEN = "control message with a wrong token"
REJECT_COMMAND = "unknown control command"
REJECT_NOT_REQUEST = "not a request the host serves"
REJECT_KICK = "kick from a vCPU that is not attached"
REJECT_INTERNAL = "internal error"

_I64_MIN = -(1 << 63)
_U64_MAX = (1 << 64) - 1

WELCOME_FIELDS = (
    "shm",
    "mem_bytes",
    "vcpu",
    "queue_gpa",
    "stack_gpa",
    "pool_gpa",
    "pool_bytes",
    "host_limit",
    "host_pid",
)


class MessageError(ValueError):
    """A doorbell message that is not one this protocol defines."""


class Hello(NamedTuple):
    version: int
    vcpu: int
    pid: int


class Welcome(NamedTuple):
    version: int
    info: dict[str, Any]


class Hypercall(NamedTuple):
    vcpu: int
    seq: int
    nr: int
    a0: int
    a1: int
    a2: int


class Return(NamedTuple):
    seq: int
    ret: int
    stamps: tuple[int, int, int] | None = None  # host's (t_recv, t_applied, t_reply), with --phases
    statuses: bytes | None = None  # one signed byte per op the host looked at, with --status


class Bye(NamedTuple):
    vcpu: int


class Reject(NamedTuple):
    seq: int | None
    reason: str


class Kick(NamedTuple):
    vcpu: int


class Complete(NamedTuple):
    vcpu: int
    cons: int


class Control(NamedTuple):
    token: str
    command: str
    args: dict[str, Any]


class ControlReply(NamedTuple):
    command: str
    result: dict[str, Any]


Message = Hello | Welcome | Hypercall | Return | Bye | Reject | Control | ControlReply | Kick | Complete

_pack = msgpack.Packer(use_bin_type=True).pack


def pack_hello(vcpu: int, pid: int) -> bytes:
    return _pack([MSG_HELLO, PROTOCOL_VERSION, vcpu, pid])


def pack_welcome(info: dict[str, Any]) -> bytes:
    return _pack([MSG_WELCOME, PROTOCOL_VERSION, info])


def pack_hypercall(vcpu: int, seq: int, nr: int, a0: int, a1: int, a2: int) -> bytes:
    return _pack([MSG_HYPERCALL, vcpu, seq, nr, a0, a1, a2])


def pack_return(seq: int, ret: int) -> bytes:
    return _pack([MSG_RETURN, seq, ret])


def pack_return_stamped(seq: int, ret: int, t_recv: int, t_applied: int, t_reply: int) -> bytes:
    return _pack([MSG_RETURN, seq, ret, t_recv, t_applied, t_reply])


def pack_return_status(seq: int, ret: int, statuses: bytes, stamps: tuple[int, int, int] | None = None) -> bytes:
    """A RETURN from a host started with --status (and --phases, if ``stamps``)."""
    if stamps is None:
        return _pack([MSG_RETURN, seq, ret, statuses])
    return _pack([MSG_RETURN, seq, ret, *stamps, statuses])


def op_status(byte: int) -> int:
    """One byte of a RETURN's statuses as the signed status it encodes: 0, or -KVM_E*."""
    return byte - 256 if byte > 127 else byte


def pack_bye(vcpu: int) -> bytes:
    return _pack([MSG_BYE, vcpu])


def pack_kick(vcpu: int) -> bytes:
    return _pack([MSG_KICK, vcpu])


def pack_complete(vcpu: int, cons: int) -> bytes:
    return _pack([MSG_COMPLETE, vcpu, cons])


def pack_reject(seq: int | None, reason: str) -> bytes:
    return _pack([MSG_REJECT, seq, reason])


def pack_control(token: str, command: str, args: dict[str, Any] | None = None) -> bytes:
    return _pack([MSG_CONTROL, token, command, args or {}])


def pack_control_reply(command: str, result: dict[str, Any]) -> bytes:
    return _pack([MSG_CONTROL_REPLY, command, result])


def _show(value: Any) -> str:
    """A short description of a hostile value: never the repr of a container, which may nest
    deeper than Python's recursion limit (the unpacker allows it) or be huge."""
    if type(value) in (int, bool, float, str, bytes) or value is None:
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."
    return f"a {type(value).__name__} of {len(value)}" if isinstance(value, (list, dict)) else type(value).__name__


def _int(value: Any, what: str, lo: int = 0, hi: int = _U64_MAX) -> int:
    # bool is an int subclass; msgpack true/false is not a register value.
    if type(value) is not int or not lo <= value <= hi:
        raise MessageError(f"{what} must be an integer in [{lo}, {hi}], not {_show(value)}")
    return value


def _str(value: Any, what: str) -> str:
    if type(value) is not str:
        raise MessageError(f"{what} must be a string, not {_show(value)}")
    return value


def _map(value: Any, what: str) -> dict[str, Any]:
    if type(value) is not dict:
        raise MessageError(f"{what} must be a map, not {_show(value)}")
    return value


def _statuses(value: Any) -> bytes:
    if type(value) is not bytes or len(value) > MAX_STATUSES:
        raise MessageError(f"statuses must be a bin of at most {MAX_STATUSES} bytes, not {_show(value)}")
    return value


def _arity(msg: list, n: int, name: str) -> None:
    if len(msg) != n:
        raise MessageError(f"{name} message has {len(msg)} elements, expected {n}")


def unpack(data: bytes) -> Message:
    """Decode and validate one doorbell message; MessageError says what is wrong."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        msg = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_MESSAGE_BYTES,
            max_bin_len=MAX_MESSAGE_BYTES,
            max_array_len=64,
            max_map_len=64,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types
        raise MessageError(f"not a msgpack message: {type(exc).__name__}: {exc}") from None
    if type(msg) is not list or not msg:
        raise MessageError(f"a message is a non-empty msgpack array, not {type(msg).__name__}")
    kind = msg[0]
    if kind == MSG_HYPERCALL and type(kind) is int:
        _arity(msg, 7, "hypercall")
        return Hypercall(
            _int(msg[1], "vcpu", 0, 1 << 31),
            _int(msg[2], "seq"),
            _int(msg[3], "hypercall nr"),
            _int(msg[4], "a0"),
            _int(msg[5], "a1"),
            _int(msg[6], "a2"),
        )
    if kind == MSG_RETURN and type(kind) is int:
        n = len(msg)
        if n not in (3, 4, 6, 7):
            raise MessageError(f"return message has {n} elements, expected 3, 4 (--status), 6 (--phases) or 7")
        stamps = None
        if n >= 6:
            stamps = (_int(msg[3], "t_recv"), _int(msg[4], "t_applied"), _int(msg[5], "t_reply"))
        statuses = _statuses(msg[-1]) if n in (4, 7) else None
        return Return(_int(msg[1], "seq"), _int(msg[2], "ret", _I64_MIN, _U64_MAX), stamps, statuses)
    if kind == MSG_HELLO and type(kind) is int:
        _arity(msg, 4, "hello")
        return Hello(_int(msg[1], "version"), _int(msg[2], "vcpu", 0, 1 << 31), _int(msg[3], "pid"))
    if kind == MSG_WELCOME and type(kind) is int:
        _arity(msg, 3, "welcome")
        info = _map(msg[2], "welcome info")
        missing = [f for f in WELCOME_FIELDS if f not in info]
        if missing:
            raise MessageError(f"welcome lacks {', '.join(missing)}")
        return Welcome(_int(msg[1], "version"), info)
    if kind == MSG_BYE and type(kind) is int:
        _arity(msg, 2, "bye")
        return Bye(_int(msg[1], "vcpu", 0, 1 << 31))
    if kind == MSG_REJECT and type(kind) is int:
        _arity(msg, 3, "reject")
        seq = None if msg[1] is None else _int(msg[1], "seq")
        return Reject(seq, _str(msg[2], "reason"))
    if kind == MSG_CONTROL and type(kind) is int:
        _arity(msg, 4, "control")
        return Control(_str(msg[1], "token"), _str(msg[2], "command"), _map(msg[3], "args"))
    if kind == MSG_KICK and type(kind) is int:
        _arity(msg, 2, "kick")
        return Kick(_int(msg[1], "vcpu", 0, 1 << 31))
    if kind == MSG_COMPLETE and type(kind) is int:
        _arity(msg, 3, "complete")
        return Complete(_int(msg[1], "vcpu", 0, 1 << 31), _int(msg[2], "cons"))
    if kind == MSG_CONTROL_REPLY and type(kind) is int:
        _arity(msg, 3, "control reply")
        return ControlReply(_str(msg[1], "command"), _map(msg[2], "result"))
    raise MessageError(f"unknown message type {_show(kind)}")


def gpa_args(gpa: int) -> tuple[int, int]:
    """The (a1, a2) register pair that carries a 64-bit gpa."""
    return gpa & 0xFFFFFFFF, gpa >> 32


def hc_gpa(a1: int, a2: int) -> int:
    """The gpa in registers a1 (low 32 bits) and a2 (high 32 bits), as KVM's hc_gpa()."""
    return (a1 & 0xFFFFFFFF) | ((a2 & 0xFFFFFFFF) << 32)
