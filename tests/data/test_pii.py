import random
import re
import time

import pytest

from aifab.data import pii
from aifab.data.pii import redact

# fake secrets, assembled so that secret scanners do not flag this file
AWS = "AKIA" + "IOSFODNN7EXAMPLE"
AWS_TEMP = "ASIA" + "Y34FZKBOKMUTVV7A"
GITHUB = "ghp" + "_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"
GITHUB_PAT = "github" + "_pat_" + "11ABCDEFG0123456789abc" + "_" + "x" * 59
OPENAI = "sk" + "-proj-" + "Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z"
SLACK = "xox" + "b-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"
GOOGLE = "AIza" + "SyDdI0hCZtE6vySjMm-WEfRq3CPzqKqqsHI"
STRIPE = "sk" + "_live_" + "4eC39HqLyjWDarjtT1zdp7dc"
PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\n"
    "MIIEowIBAAKCAQEA1c3fakeKEYmaterial+/abc==\n"
    "bm90IGEgcmVhbCBrZXkgYXQgYWxs\n"
    "-----END RSA PRIVATE KEY-----"
)


def test_secret_formats_are_each_redacted_once() -> None:
    for secret in (AWS, AWS_TEMP, GITHUB, GITHUB_PAT, OPENAI, SLACK, GOOGLE, STRIPE):
        out, counts = redact(f'token = "{secret}"\n')
        assert out == 'token = "<SECRET>"\n', secret
        assert counts == {"secret": 1}


def test_private_key_blocks_are_removed_whole() -> None:
    out, counts = redact(f"key:\n{PEM}\nafter 10.0.0.1\n")
    assert out == "key:\n<PRIVATE_KEY>\nafter <IPV4>\n"
    assert counts == {"private_key": 1, "ipv4": 1}
    generic = PEM.replace("RSA PRIVATE", "PRIVATE").replace("EA1c3", AWS)  # a key inside is not counted twice
    assert redact(generic) == ("<PRIVATE_KEY>", {"private_key": 1})
    cut = PEM.rsplit("\n", 1)[0] + "\n"  # truncated before its END line: the body still goes
    out, counts = redact("x\n" + cut)
    assert out == "x\n<PRIVATE_KEY>" and counts == {"private_key": 1}
    assert redact("-----BEGIN PUBLIC KEY-----\nabc\n-----END PUBLIC KEY-----")[1] == {}


def test_emails() -> None:
    out, counts = redact("Mail <bob.smith+tag@mail.example.co.uk>, alice@example.com. Not @property or a @ b.")
    assert out == "Mail <<EMAIL>>, <EMAIL>. Not @property or a @ b."
    assert counts == {"email": 2}
    assert redact("@decorator\ndef f(): return x @ y")[1] == {}


def test_ipv4_validates_octets_and_skips_versions() -> None:
    out, counts = redact("hosts 192.168.0.1, 8.8.8.8 and 255.255.255.255.")
    assert out == "hosts <IPV4>, <IPV4> and <IPV4>."
    assert counts == {"ipv4": 3}
    for text in ("256.1.1.1", "1.2.3.999", "v1.2.3.4", "1.2.3.4.5", "01.02.03.04", "pkg-1.2.3.4a", "3.11.7"):
        assert redact(text) == (text, {}), text


def test_ipv6_is_validated_and_not_confused_with_code_or_times() -> None:
    text = "a 2001:db8::1 b fe80::1ff:fe23:4567:890a c 2001:0db8:85a3:0000:0000:8a2e:0370:7334 d ::ffff:192.0.2.1"
    out, counts = redact(text)
    assert out == "a <IPV6> b <IPV6> c <IPV6> d <IPV6>"
    assert counts == {"ipv6": 4}  # the IPv4 tail of the last one is part of it, not a second address
    assert redact("[2001:db8::1]:8080") == ("[<IPV6>]:8080", {"ipv6": 1})
    for text in (
        "::",
        "::1",
        "at 12:34:56",
        "x[1::2]",
        "x[10::20]",
        "std::vector",
        "a::b",
        "dead::beef",
        "00:1a:2b:3c:4d:5e",
        "Foo::Bar::baz()",
        "ab:cd:ef",
    ):
        assert redact(text) == (text, {}), text


def test_openai_style_needs_a_key_shaped_body() -> None:
    for text in ("sk-learn", "a risk-free-approach-for-everyone-2024", "task-" + OPENAI[3:], "sk-" + "a" * 40):
        assert redact(text) == (text, {}), text


def test_planted_corpus_nothing_survives_and_counts_are_exact() -> None:
    planted = {
        "email": ["jane.doe@corp.example", "ops@example.org"],
        "ipv4": ["10.1.2.3"],
        "ipv6": ["2001:db8:abcd:12::1"],
        "secret": [AWS, GITHUB, STRIPE],
        "private_key": [PEM],
    }
    rnd = random.Random(0)
    filler = ["lorem", "ipsum", "dolor", "value", "=", "3.14;", "items[1:2];", "print(a", "@", "b)", "v1.2.3"]
    pieces = [v for vs in planted.values() for v in vs] * 2
    rnd.shuffle(pieces)
    text = "\n".join(" ".join(rnd.choices(filler, k=8)) + f" {p} " for p in pieces)
    out, counts = redact(text)
    assert counts == {kind: 2 * len(vs) for kind, vs in planted.items()}
    for vs in planted.values():
        for v in vs:
            assert v not in out
    for kind, n in counts.items():
        assert out.count(pii.PLACEHOLDERS[kind]) == n


def test_matches_never_overlap() -> None:
    # like re.sub, a scan resumes where the last match ended: "b.ccd@e.ff" overlaps "a@b.ccd" and is not a match
    assert redact("a@b.ccd@e.ff") == ("<EMAIL>@e.ff", {"email": 1})
    assert redact("1.2.3.4.5.6.7.8") == ("1.2.3.4.5.6.7.8", {})


def test_clean_text_is_returned_as_is() -> None:
    text = "def f(x):\n    return x[::-1]  # version 1.2.3\n"
    out, counts = redact(text)
    assert out is text and counts == {}


@pytest.mark.parametrize("kind", ["email", "ipv4", "ipv6"])
def test_anchored_search_equals_a_plain_regex_scan(kind: str) -> None:
    """The hint-anchored fast path must find exactly what re.sub over every position finds."""
    pattern = {"email": pii._EMAIL, "ipv4": pii._IPV4, "ipv6": pii._IPV6}[kind]
    accept = pii.is_ipv6 if kind == "ipv6" else (lambda s: True)
    step = dict(pii._STEPS)[kind]
    parts = {
        "email": (["a", "b1", "x.y", "_", "-", "+", "com", "io"], "@."),
        "ipv4": (["1", "25", "255", "256", "0", "01", "7"], "...:"),
        "ipv6": (["fe80", "2001", "db8", "1", "ab", "", "1.2.3.4"], ":::."),
    }
    words, joiners = parts[kind]
    rnd = random.Random(1)
    total = 0
    for _ in range(300):
        chunks = [
            rnd.choice(["", "", "v", ".", "[", "_", ":"])
            + rnd.choice(joiners).join(rnd.choices(words, k=rnd.randint(2, 9)))
            + rnd.choice(["", ".", "]", " ", "a", ":"])
            for _ in range(30)
        ]
        text = rnd.choice([" ", "", "\n"]).join(chunks)
        hits = 0

        def ref(m: re.Match[str]) -> str:
            nonlocal hits
            if not accept(m.group()):
                return m.group()
            hits += 1
            return pii.PLACEHOLDERS[kind]

        expected = pattern.sub(ref, text)
        assert step(text) == (expected, hits), text
        total += hits
    assert total > 50  # the fuzz did exercise real matches


@pytest.mark.parametrize(
    "text",
    [
        "-----BEGIN PRIVATE KEY-----\n" * 5_000 + "x" * 100_000,  # unterminated blocks: no rescans to the end
        "-----END PRIVATE KEY-----" + "-----BEGIN PRIVATE KEY----- ~" * 5_000,
        ("x" * 60 + "@") * 5_000 + "b." * 50_000,  # many "@" hints, each walking back over a long local part
        "sk-" + "a-" * 100_000,
        "1." * 100_000 + "::" + "ab:" * 50_000,
    ],
)
def test_adversarial_inputs_stay_linear(text: str) -> None:
    start = time.perf_counter()
    redact(text)
    assert time.perf_counter() - start < 2.0  # quadratic behaviour would take minutes
