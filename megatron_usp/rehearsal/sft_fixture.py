"""A tiny chat dataset for Megatron-LM's --sft loader, made locally (no download):

    PYTHONPATH=MEGATRON_DIR:SFT_DEPS:REPO python -m megatron_usp.rehearsal.sft_fixture FOLDER 128

writes ``FOLDER/tokenizer`` (a character-level HF tokenizer with the special tokens of SFTTokenizer's
nemotron-h-aligned template) and ``FOLDER/sft.jsonl`` (8 rows of 2-4 conversations), then prints ``SFT FIXTURE OK``.
Every conversation is a multiple of 8 tokens long (EOD included) and a row at most 128: Megatron's SFTDataset pads
each conversation to a multiple of 2 x CP when CP > 1 and truncates long rows, which would make the baseline's rows
(CP = 1) differ from the USP run's (CP = 4). Needs transformers<5, tokenizers and jinja2
(:func:`megatron_usp.rehearsal.cases.sft_data_args` reads the files).
"""
import importlib.util
import json
import random
import sys
import types
from pathlib import Path

LEGACY_MARK = "legacy-tokenizer"  # in the fixture folder when the checkout's SFTTokenizer is a legacy tokenizer


def main() -> None:
    out, seq = Path(sys.argv[1]), int(sys.argv[2])
    if importlib.util.find_spec("triton") is None:  # megatron.training imports it for --batch-invariant-mode only
        stub = types.ModuleType("batch_invariant_kernels")
        stub.enable_batch_invariant_mode = lambda *a, **k: None
        sys.modules["megatron.core.transformer.custom_layers.batch_invariant_kernels"] = stub
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    special = ["<unk>", "<eos>", "<SPECIAL_10>", "<SPECIAL_11>", "<SPECIAL_12>", "<SPECIAL_233>"]
    vocab = {token: i for i, token in enumerate(special + [chr(c) for c in range(32, 127)] + [chr(10)])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.add_special_tokens(special)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>",
                            pad_token="<SPECIAL_233>").save_pretrained(out / "tokenizer")
    try:  # Megatron-LM <= 0.18: a legacy tokenizer (--legacy-tokenizer); later releases keep it in megatron.core
        from megatron.training.tokenizer.sft_tokenizer import SFTTokenizer
        (out / LEGACY_MARK).write_text("SFTTokenizer is in megatron.training.tokenizer: pass --legacy-tokenizer\n")
    except ImportError:
        from megatron.core.tokenizers.text.libraries.sft_tokenizer import SFTTokenizer
        (out / LEGACY_MARK).unlink(missing_ok=True)
    sft = SFTTokenizer(str(out / "tokenizer"), "nemotron-h-aligned")
    rng = random.Random(1234)

    def words(n):  # no spaces: the template strips the content
        return "".join(rng.choice("abcdefghijklmnopqrst") for _ in range(n))

    def conversation(length):
        messages = [{"role": "system", "content": ""}, {"role": "user", "content": words(rng.randint(1, 6))},
                    {"role": "assistant", "content": "a"}]
        short = len(sft.tokenize_conversation(messages, return_target=False, add_generation_prompt=False)) + 1
        messages[2]["content"] = words(length - short + 1)
        assert len(sft.tokenize_conversation(messages, return_target=False, add_generation_prompt=False)) + 1 == length
        return messages

    rows = []
    for _ in range(8):
        lengths = []
        while True:
            length = rng.choice([40, 48, 56])  # a conversation with an empty answer has 31-36 tokens
            if sum(lengths) + length > seq or len(lengths) == 4:
                break
            lengths.append(length)
        rows.append({"messages": [m for length in lengths for m in conversation(length)]})
        print("row of conversations with", lengths, "tokens")
    (out / "sft.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    print("SFT FIXTURE OK", out)


if __name__ == "__main__":
    main()
