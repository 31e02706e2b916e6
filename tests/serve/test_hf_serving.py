"""An imported Hugging Face model is served as `transformers` runs it: same prompt tokens (its tokenizer's own
BOS), same greedy tokens, and generation ends at the checkpoint's EOS token."""

import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from aifab.nn.sampling import SamplingParams
from aifab.serve.engine import Delta, Done, Engine, Event, Request
from aifab.serve.loaded import LoadedModel
from aifab.store import Store
from helpers import aifab

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

VOCAB = 160
PROMPTS = ["hello world", "def add(a, b):", "return a + b, hello"]


def tokenizer_json() -> str:
    """A BPE tokenizer whose post-processor puts <s> (id 1) before every text, as Llama's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(["hello world, def add(a, b):\n    return a + b\n"] * 20, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok.to_str()


def hf_generate(model: Any, tok: Any, prompt: str, max_new: int, eos: int | None) -> list[int]:
    ids = tok(prompt, return_tensors="pt").input_ids
    assert ids[0, 0].item() == 1  # the tokenizer's own BOS
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=0, attention_mask=None
        )
    return [int(t) for t in out[0, ids.size(1) :]]


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any, int]:
    """(home, HF model, HF tokenizer, eos id): a random GQA Llama imported as `llama`, whose EOS is a token its
    greedy output for PROMPTS[0] reaches after a few steps, so the stop is exercised."""
    from tokenizers import Tokenizer

    root = tmp_path_factory.mktemp("hf_serving")
    src = root / "src"
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json()))
    free_run = hf_generate(model, tok, PROMPTS[0], 24, None)
    eos = next(t for i, t in enumerate(free_run) if i >= 4 and t not in free_run[:i])
    model.generation_config.eos_token_id = eos
    model.config.eos_token_id = eos
    model.save_pretrained(src, safe_serialization=True)
    (src / "tokenizer.json").write_text(tokenizer_json())
    home = root / "home"
    proc = aifab("import-hf", str(src), "--name", "llama", home=home)
    assert proc.returncode == 0, proc.stderr
    return home, model, tok, eos


def run(engine: Engine, prompt_ids: list[int], max_tokens: int) -> tuple[list[int], Done]:
    tokens: list[int] = []
    done: list[Done] = []
    finished = threading.Event()

    def emit(e: Event) -> None:
        if isinstance(e, Delta):
            tokens.extend(x.token for x in e.logprobs)
        else:
            done.append(e)
            finished.set()

    engine.submit(Request(prompt_ids, SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=0), emit))
    assert finished.wait(60)
    return tokens, done[0]


def test_greedy_tokens_and_eos_match_transformers(imported: tuple[Path, Any, Any, int]) -> None:
    home, model, tok, eos = imported
    store = Store(home)
    try:
        lm = LoadedModel.load(store, "llama")
    finally:
        store.close()
    assert lm.stop_ids == {eos} and lm.prefix_ids == ()
    engine = Engine(lm, max_batch=4, chunk_tokens=5)  # batched, prompts split into chunks
    try:
        for prompt in PROMPTS:
            want = hf_generate(model, tok, prompt, 20, eos)
            prompt_ids = lm.encode(prompt)
            assert prompt_ids == tok(prompt).input_ids  # BOS included, as transformers encodes it
            got, done = run(engine, prompt_ids, 20)
            stopped = bool(want) and want[-1] == eos
            assert got == (want[:-1] if stopped else want), prompt
            assert done.finish_reason == ("stop" if stopped else "length")
            assert done.completion_tokens == len(got)
        first, _ = run(engine, lm.encode(PROMPTS[0]), 20)
        assert len(first) < 20  # the chosen EOS really ended the first prompt early
    finally:
        engine.close()
