"""machines.scm read as data: upstream's documented forms parse, Scheme code is refused with the
line and column of the offending form."""

from __future__ import annotations

from pathlib import Path

import pytest

from guixsvc.offload.machines import MachinesError, load_machines, parse_machines

MANUAL_EXAMPLE = """\
(list (build-machine
        (name "eightysix.example.org")
        (systems (list "x86_64-linux" "i686-linux"))
        (host-key "ssh-ed25519 AAAAC3Nza...")
        (user "bob")
        (speed 2.))     ;incredibly fast!

      (build-machine
        (name "armeight.example.org")
        (systems (list "aarch64-linux"))
        (host-key "ssh-rsa AAAAB3Nza...")
        (user "alice")

        ;; Remember 'guix offload' is spawned by
        ;; 'guix-daemon' as root.
        (private-key "/root/.ssh/identity-for-guix")))
"""


def test_the_manual_example() -> None:
    a, b = parse_machines(MANUAL_EXAMPLE)
    assert (a.name, a.systems, a.user, a.speed, a.port) == (
        "eightysix.example.org", ["x86_64-linux", "i686-linux"], "bob", 2.0, 22,
    )  # fmt: skip
    assert (a.parallel_builds, a.overload_threshold, a.features) == (1, 0.6, [])
    assert a.daemon_socket == "/var/guix/daemon-socket/socket"
    assert b.private_key == "/root/.ssh/identity-for-guix" and b.host_key.startswith("ssh-rsa")
    assert b.location == "machines.scm:8:6"


def test_every_field_and_literal_forms() -> None:
    (m,) = parse_machines(
        "#| block |# (use-modules (gnu)) #;(ignored)\n"
        '(list (build-machine (name "h") (port 2222) (systems \'("x86_64-linux"))\n'
        ' (user "u") (host-key "ssh-ed25519 K") (parallel-builds 4) (speed 1)\n'
        ' (overload-threshold #f) (features \'()) (compression "none")\n'
        ' (compression-level 1) (daemon-socket "/s\\x41;")))'
    )
    assert (m.port, m.parallel_builds, m.speed, m.overload_threshold) == (2222, 4, 1.0, None)
    assert (m.features, m.compression, m.daemon_socket) == ([], "none", "/sA")
    assert parse_machines("'()") == [] and parse_machines("(list)") == []


def test_deprecated_system_field_warns() -> None:
    warnings: list[str] = []
    (m,) = parse_machines(
        '(list (build-machine (name "h") (system "x86_64-linux") (user "u") (host-key "k a")))',
        warnings=warnings,
    )
    assert m.systems == ["x86_64-linux"]
    assert "The 'system' field is deprecated, please use 'systems' instead." in warnings[0]


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        ('(define x 1)\n(list)', "1:0", "`(define ...)' is Scheme code"),
        ("(list\n  (let ((a 1)) a))", "2:2", "`(let ...)' is Scheme code"),
        ('(list (build-machine (name (string-append "a" "b"))))', "1:27",
         "`(string-append ...)' is Scheme code"),
        ("`(1 ,x)", "1:0", "quasiquote is not supported"),
        ('(list (build-machine (name "a") (user "u") (host-key "k") (systems (list "x"))\n'
         "  (color \"red\")))", "2:9", "extraneous field initializers (color)"),
        ('(list (build-machine (name "a")))', "1:6", "missing field initializers (user host-key"),
        ('(list (build-machine (name "a") (port "22")))', "1:38", "`port' must be"),
        ('(list (build-machine (name "a")', "1:6", "unexpected end of file"),
        ('(list) (list)', "1:7", "only one expression"),
    ],
)  # fmt: skip
def test_code_and_errors_are_refused_with_a_location(text: str, where: str, what: str) -> None:
    with pytest.raises(MachinesError) as info:
        parse_machines(text, "/etc/guix/machines.scm")
    assert str(info.value).startswith(f"/etc/guix/machines.scm:{where}: "), str(info.value)
    assert what in str(info.value)


def test_missing_file_is_no_machines(tmp_path: Path) -> None:
    assert load_machines(str(tmp_path / "machines.scm")) == []
    (tmp_path / "machines.scm").mkdir()
    with pytest.raises(MachinesError, match="failed to open machine file"):
        load_machines(str(tmp_path / "machines.scm"))
