"""Names users give to datasets and models, and the references that point at model versions."""

import re
from dataclasses import dataclass

from aifab.errors import AifabError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_name(name: str, what: str = "name") -> str:
    """Return `name` if it is a valid dataset or model name, else raise naming the value.

    Names are 1-64 characters of letters, digits, '.', '_' and '-', starting with a letter or digit, so a
    name can never be a path, an option or an empty string.
    """
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise AifabError(
            f"invalid {what} {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class ModelRef:
    """`name`, `name:VERSION` or `name@ALIAS`; a bare name means the highest version."""

    name: str
    version: int | None = None
    alias: str | None = None

    @classmethod
    def parse(cls, text: str) -> "ModelRef":
        if "@" in text:
            name, alias = text.split("@", 1)
            return cls(check_name(name, "model name"), alias=check_name(alias, "alias"))
        if ":" in text:
            name, version = text.split(":", 1)
            if not (version.isascii() and version.isdigit()) or int(version) < 1:
                raise AifabError(f"invalid model version in {text!r}: expected a positive integer after ':'")
            return cls(check_name(name, "model name"), version=int(version))
        return cls(check_name(text, "model name"))

    def __str__(self) -> str:
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        if self.version is not None:
            return f"{self.name}:{self.version}"
        return self.name
