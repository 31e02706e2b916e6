"""The end-of-text token of a tokenizer: what separates documents in shards and ends a generation.

Tokenizers trained by the data line have `<|endoftext|>` as id 0. Imported ones name it after their family:
GPT-2 and Qwen2 `<|endoftext|>`, Llama 2 and Mistral `</s>`, Llama 3 `<|end_of_text|>`, Gemma `<eos>`.
The first of these the vocabulary holds is the one used.
"""

from typing import Any

EOT = "<|endoftext|>"
END_OF_TEXT = (EOT, "</s>", "<|end_of_text|>", "<eos>")


def end_of_text_id(tok: Any) -> int:
    """The id of the tokenizer's end-of-text token; ValueError naming the candidates when it has none."""
    for token in END_OF_TEXT:
        token_id = tok.token_to_id(token)
        if token_id is not None:
            return int(token_id)
    raise ValueError(f"the tokenizer has no end-of-text token (looked for {', '.join(END_OF_TEXT)})")
