"""What generating with a Hugging Face checkpoint needs beyond its weights: BOS/EOS token ids and strings,
whether the tokenizer adds BOS itself, and the chat template. Read from the optional generation_config.json,
config.json, tokenizer_config.json, chat_template.jinja and tokenizer.json; written back as
generation_config.json and tokenizer_config.json."""

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypedDict


class Generation(TypedDict):
    """How to generate with a checkpoint; JSON as it is (the registry stores it with a model version)."""

    bos_token_id: int | None
    eos_token_ids: list[int]  # generation ends at any of these; maybe empty (then: unknown)
    add_bos: bool  # tokenizer.json itself puts a special token (BOS) before the text when encoding
    bos_token: str | None  # the strings in tokenizer_config.json, which chat templates use
    eos_token: str | None
    chat_template: str | None  # Jinja


def _optional_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when there is no such file; ValueError naming the file otherwise."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not valid JSON: expected an object, found {type(data).__name__}")
    return data


def _token_ids(value: Any, where: Path, key: str) -> list[int]:
    """An HF token id field (absent, an int or a list of ints) as a list."""
    values = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"{where}: {key} {value!r} is not a token id or a list of token ids")
    return list(values)


def _token_string(value: Any, where: Path, key: str) -> str | None:
    """An HF special-token field: absent, a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{where}: {key} {value!r} is not a string or a token with content")
    return value


def _chat_template(root: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """chat_template.jinja if present (newer HF dirs), else tokenizer_config.json's chat_template: a string, or a
    list of {name, template} from which the one named "default" (else the first) is taken."""
    jinja = root / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{jinja} cannot be read: {e}") from None
    where = root / "tokenizer_config.json"
    value = tokenizer_config.get("chat_template")
    if isinstance(value, list):
        named = [t for t in value if isinstance(t, dict) and isinstance(t.get("template"), str)]
        if len(named) != len(value):
            raise ValueError(f"{where}: chat_template is a list whose items are not all {{name, template}}")
        value = next((t for t in named if t.get("name") == "default"), named[0])["template"] if named else None
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{where}: chat_template is neither a string nor a list of {{name, template}}")
    return value


def _adds_bos(path: Path) -> bool:
    """Whether tokenizer.json's post-processor puts a special token before the text when encoding."""
    from tokenizers import Tokenizer

    if not path.is_file():
        return False
    try:
        tok = Tokenizer.from_str(path.read_text())
    except Exception as e:  # tokenizers raises its own exception type for a bad file
        raise ValueError(f"{path} is not a valid tokenizer: {' '.join(str(e).split())}") from None
    try:
        with_special = tok.encode("hello").ids
        plain = tok.encode("hello", add_special_tokens=False).ids
    except Exception:  # e.g. a word-level vocabulary without an unknown token: it cannot say, so no BOS
        return False
    special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    return len(with_special) > len(plain) and with_special[0] in special and with_special[1 : 1 + len(plain)] == plain


def read_generation(path: str | Path) -> Generation:
    """How to generate with the HF checkpoint in directory `path`, every key present: token ids from
    generation_config.json where it sets them, else from config.json; token strings from tokenizer_config.json;
    the chat template from chat_template.jinja, else tokenizer_config.json; `add_bos` from tokenizer.json.

    Every file is optional; one that is present but malformed is a ValueError naming it.
    """
    root = Path(path)
    config = _optional_json(root / "config.json") or {}
    generation_config = _optional_json(root / "generation_config.json") or {}
    tokenizer_config = _optional_json(root / "tokenizer_config.json") or {}

    def ids(key: str) -> list[int]:
        for name, data in (("generation_config.json", generation_config), ("config.json", config)):
            if data.get(key) is not None:
                return _token_ids(data[key], root / name, key)
        return []

    bos = ids("bos_token_id")
    where = root / "tokenizer_config.json"
    return {
        "bos_token_id": bos[0] if bos else None,
        "eos_token_ids": ids("eos_token_id"),
        "add_bos": _adds_bos(root / "tokenizer.json"),
        "bos_token": _token_string(tokenizer_config.get("bos_token"), where, "bos_token"),
        "eos_token": _token_string(tokenizer_config.get("eos_token"), where, "eos_token"),
        "chat_template": _chat_template(root, tokenizer_config),
    }


def generation_files(generation: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The generation_config.json and tokenizer_config.json that hold `generation` (as read_generation returns
    it), by file name; a file with nothing to hold is left out."""
    files: dict[str, dict[str, Any]] = {}
    gen: dict[str, Any] = {}
    if generation.get("bos_token_id") is not None:
        gen["bos_token_id"] = generation["bos_token_id"]
    eos = list(generation.get("eos_token_ids") or [])
    if eos:
        gen["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if gen:
        files["generation_config.json"] = gen
    tok = {k: generation[k] for k in ("bos_token", "eos_token", "chat_template") if generation.get(k) is not None}
    if tok:
        # the tokenizer is tokenizer.json exactly as stored, post-processor included (a Llama tokenizer class
        # would rebuild it from its own add_bos_token default)
        files["tokenizer_config.json"] = {"tokenizer_class": "PreTrainedTokenizerFast", **tok}
    return files
