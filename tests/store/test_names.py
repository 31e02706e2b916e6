"""Names of datasets and models, and references to model versions."""

import pytest

from aifab.errors import AifabError
from aifab.store.names import ModelRef, check_name


@pytest.mark.parametrize("name", ["a", "demo", "Demo-2", "x.y_z", "0start", "a" * 64, "gpt2.small-v1_final"])
def test_check_name_accepts(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "../x",
        "..",
        ".hidden",
        "-flag",
        "--help",
        "_private",
        "a" * 65,
        "has space",
        " lead",
        "trail ",
        "tab\tname",
        "line\n",
        "abc\n",  # a trailing newline must not slip past the pattern's `$`
        "a/b",
        "a\\b",
        "a:1",
        "a@b",
        "naïve",
        "模型",
        "a\x00",
        "~user",
        "$HOME",
    ],
)
def test_check_name_rejects(name: str) -> None:
    with pytest.raises(AifabError) as exc:
        check_name(name)
    assert repr(name) in str(exc.value)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("value", [None, 3, b"demo", ["demo"]])
def test_check_name_rejects_non_strings(value: object) -> None:
    with pytest.raises(AifabError):
        check_name(value)  # type: ignore[arg-type]


def test_check_name_says_what_was_checked() -> None:
    with pytest.raises(AifabError, match="invalid dataset name"):
        check_name("../x", "dataset name")


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("a", ModelRef("a")),
        ("a:3", ModelRef("a", version=3)),
        ("a:03", ModelRef("a", version=3)),
        ("a@prod", ModelRef("a", alias="prod")),
        ("my-model.v2:12", ModelRef("my-model.v2", version=12)),
    ],
)
def test_model_ref_parse(text: str, ref: ModelRef) -> None:
    assert ModelRef.parse(text) == ref


@pytest.mark.parametrize("text", ["a", "a:3", "a@prod"])
def test_model_ref_str_round_trips(text: str) -> None:
    assert str(ModelRef.parse(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "a:0",
        "a:-1",
        "a:x",
        "a:",
        "a:+3",
        "a: 3",
        "a:1.5",
        "a:1:2",
        "a:\u00b3",  # superscript three: str.isdigit() says yes, int() says no
        "a:\u0663",  # Arabic-Indic three: not a version a user typed on purpose
        "a@",
        "@prod",
        ":3",
        "",
        "a@b@c",
        "a@../x",
        "../x:1",
        "-a",
    ],
)
def test_model_ref_parse_errors(text: str) -> None:
    with pytest.raises(AifabError) as exc:
        ModelRef.parse(text)
    assert "\n" not in str(exc.value)


def test_model_ref_version_error_names_the_text() -> None:
    with pytest.raises(AifabError, match="'a:0'"):
        ModelRef.parse("a:0")
