"""The newer detectors of gateway/sensitive.py as tables: passwords in URLs, US SSNs and UK
National Insurance numbers, each with positives and the near misses that must stay clean."""
from __future__ import annotations

import hashlib

import pytest

from gateway.sensitive import KINDS, find_sensitive, redact


def found(text: str) -> list[tuple[str, str]]:
    return [(f.kind, text[f.start:f.end]) for f in find_sensitive(text)]


@pytest.mark.parametrize(("text", "password"), [
    ("connect to postgres://admin:hunter2@10.0.0.5/db now", "hunter2"),
    ("GET https://bob:pw@localhost/api", "pw"),
    ("REDIS_URL=redis://:s3cr3t@cache:6379/0", "s3cr3t"),
    ("amqp://guest:gu3st!x@rabbit.example.com:5672/", "gu3st!x"),
    ("mongodb+srv://app:P%40ss@cluster0.example.net/db", "P%40ss"),
    ("mysql://root:r00t:pw@db.internal:3306", "r00t:pw"),  # a colon inside the password
    ("ftp://anon:x1@ftp.example.org", "x1"),
    ("(see 'https://ci:ghx-88a@git.example.com/org/repo.git')", "ghx-88a"),
])
def test_password_in_a_url_is_a_secret(text: str, password: str) -> None:
    assert found(text) == [("URL_PASSWORD", password)]
    out = redact(text)
    assert password not in out.replace("URL_PASSWORD", "")
    assert f"[URL_PASSWORD len={len(password)} h={hashlib.sha256(password.encode()).hexdigest()[:8]}]@" in out


@pytest.mark.parametrize("text", [
    "https://example.com/path?q=1",
    "http://host:8080/index.html",
    "http://host:8080/x@y",  # an @ in the path, not in the authority
    "see http://[::1]:8080/health",
    "postgres://localhost:5432/app",
    # templates and masks in documentation are not secrets
    "postgres://user:password@localhost/db",
    "postgres://user:${DB_PASSWORD}@db/app",
    "postgres://user:$DB_PASS@db/app",
    "https://user:***@host.example.com",
    "https://user:xxxx@host.example.com",
    "redis://default:<password>@cache:6379",
    "amqp://guest:{{ rabbit_pass }}@rabbit/",
    "mysql://app:%s@db/app",
])
def test_url_near_misses_hold_no_url_password(text: str) -> None:
    assert "URL_PASSWORD" not in {kind for kind, _ in found(text)}


@pytest.mark.parametrize("text", [
    "ssh://git@github.com:22/repo",
    "https://user@host.example.com/",
    "mailto:bob@example.com",
])
def test_a_url_with_a_user_but_no_password_is_at_most_an_email(text: str) -> None:
    assert {kind for kind, _ in found(text)} <= {"EMAIL"}


@pytest.mark.parametrize(("text", "ssn"), [
    ("SSN 123-45-6789 on file", "123-45-6789"),
    ("ssn:078-05-1120", "078-05-1120"),
    ("012-34-5678", "012-34-5678"),  # a leading 0 is an SSN's shape, not a phone number
    ("ids 665-12-3456 and 667-12-3456", "665-12-3456"),
])
def test_us_ssn_is_pii(text: str, ssn: str) -> None:
    assert found(text)[0] == ("US_SSN", ssn)


@pytest.mark.parametrize("text", [
    "000-12-3456",  # area 000
    "666-12-3456",  # area 666
    "900-12-3456",  # area 9xx
    "987-65-4321",
    "123-00-4567",  # group 00
    "123-45-0000",  # serial 0000
    "1123-45-6789",  # part of a longer number
    "123-45-67890",
    "123-45-6789-01",
    "call 415-555-0132",  # a phone number (3-3-4)
    "on 2024-05-01",
    "123 45 6789",  # only the dashed form
])
def test_ssn_near_misses(text: str) -> None:
    assert "US_SSN" not in {kind for kind, _ in found(text)}


@pytest.mark.parametrize(("text", "nino"), [
    ("NINO QQ123456C", "QQ123456C"),  # HMRC's documented specimen format
    ("ni: AB 12 34 56 C.", "AB 12 34 56 C"),
    ("AB123456D", "AB123456D"),
    ("JG 123456 A", "JG 123456 A"),
    ("(ZY123456B)", "ZY123456B"),
])
def test_uk_nino_is_pii(text: str, nino: str) -> None:
    assert found(text) == [("UK_NINO", nino)]


@pytest.mark.parametrize("text", [
    "AB123456E",  # the suffix is A-D
    "DA123456C", "FA123456C", "IA123456C", "UA123456C", "VA123456C",  # never a first letter
    "AO123456C", "AD123456C",  # never a second letter
    "GB123456C", "BG123456C", "NK123456C", "KN123456C", "TN123456C", "NT123456C", "ZZ123456C",  # not allocated
    "XAB123456C", "AB1234567C", "AB12345C", "ab123456c", "order AB123456C1", "1AB123456C",
    "ISO 9001 2015A",
])
def test_nino_near_misses(text: str) -> None:
    assert "UK_NINO" not in {kind for kind, _ in found(text)}


def test_new_kinds_are_listed() -> None:
    assert {"URL_PASSWORD", "US_SSN", "UK_NINO"} <= KINDS


def test_mixed_text_finds_each_once_in_order() -> None:
    text = "db postgres://svc:Tr0ub4dor@10.1.2.3/app, SSN 219-09-9999, NINO CE 12 34 56 A, bob@example.com"
    assert found(text) == [("URL_PASSWORD", "Tr0ub4dor"), ("US_SSN", "219-09-9999"),
                           ("UK_NINO", "CE 12 34 56 A"), ("EMAIL", "bob@example.com")]
