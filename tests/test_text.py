"""Text encoder: both checkpoint layouts agree (and match Wan's T5 math), padding rows are zero,
prompt cleaning, truncation, the disk cache, and the error messages for bad folders/prompts."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from memrope.runtime.text import (
    WAN_T5_CHECKPOINT,
    WAN_TOKENIZER_DIR,
    TextEncoder,
    build_tiny_text_model,
    clean_prompt,
    encode_cached,
)

TEXT_LEN = 16
D_MODEL = 32
PROMPTS = ["a cat runs", "the big red dog jumps over a river near the old house"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_text")
    return {layout: build_tiny_text_model(root / layout, layout=layout, d_model=D_MODEL,
                                          text_len=TEXT_LEN, seed=0)
            for layout in ("diffusers", "wan")}


@pytest.fixture(scope="module")
def encoders(tiny_dirs) -> dict[str, TextEncoder]:
    encs = {k: TextEncoder.from_model_dir(d, text_len=TEXT_LEN) for k, d in tiny_dirs.items()}
    yield encs
    for enc in encs.values():
        enc.close()


def _wan_reference(state: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor,
                   num_heads: int) -> torch.Tensor:
    """Wan's ``T5Encoder.forward`` (``wan/modules/t5.py``, shared_pos=False, eval) written out on
    Wan's own key names: ids/mask ``[B, L]`` -> ``[B, L, D]``."""

    def norm(x, w):
        return w * (x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6))

    def gelu_tanh(x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))

    def buckets(rel, num_buckets=32, max_dist=128):
        num_buckets //= 2
        out = (rel > 0).long() * num_buckets
        rel = rel.abs()
        max_exact = num_buckets // 2
        large = max_exact + (torch.log(rel.float() / max_exact) / math.log(max_dist / max_exact)
                             * (num_buckets - max_exact)).long()
        large = torch.minimum(large, torch.full_like(large, num_buckets - 1))
        return out + torch.where(rel < max_exact, rel, large)

    b, length = ids.shape
    x = state["token_embedding.weight"][ids]
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    layers = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for i in range(layers):
        p = lambda name, i=i: state[f"blocks.{i}.{name}"]  # noqa: E731
        h = norm(x, p("norm1.weight"))
        q, k, v = (torch.nn.functional.linear(h, p(f"attn.{n}.weight")).view(b, length, num_heads, -1)
                   for n in "qkv")
        bias = p("pos_embedding.embedding.weight")[buckets(rel)].permute(2, 0, 1)[None].clone()
        bias = bias.expand(b, -1, -1, -1).clone()
        bias.masked_fill_(mask.view(b, 1, 1, -1) == 0, torch.finfo(x.dtype).min)
        attn = torch.softmax((torch.einsum("binc,bjnc->bnij", q, k) + bias).float(), -1)
        out = torch.einsum("bnij,bjnc->binc", attn, v).reshape(b, length, -1)
        x = x + torch.nn.functional.linear(out, p("attn.o.weight"))
        h = norm(x, p("norm2.weight"))
        ff = (torch.nn.functional.linear(h, p("ffn.fc1.weight"))
              * gelu_tanh(torch.nn.functional.linear(h, p("ffn.gate.0.weight"))))
        x = x + torch.nn.functional.linear(ff, p("ffn.fc2.weight"))
    return norm(x, state["norm.weight"])


def test_both_layouts_load_and_agree(encoders):
    diff = encoders["diffusers"].encode(PROMPTS)
    wan = encoders["wan"].encode(PROMPTS)
    assert diff.shape == (len(PROMPTS), TEXT_LEN, D_MODEL) and diff.dtype == torch.float32
    assert torch.equal(diff, wan)
    _, mask = encoders["wan"].tokenize(PROMPTS)
    lengths = mask.sum(1)
    assert lengths[0] < lengths[1] <= TEXT_LEN
    for row, n in enumerate(lengths.tolist()):
        assert (diff[row, n:] == 0).all()
        assert (diff[row, :n].abs().sum(-1) > 0).all()


def test_wan_layout_matches_wan_reference_math(tiny_dirs, encoders):
    state = torch.load(tiny_dirs["wan"] / WAN_T5_CHECKPOINT, map_location="cpu", weights_only=True)
    ids, mask = encoders["wan"].tokenize(PROMPTS)
    ref = _wan_reference(state, ids, mask, num_heads=2)
    ref = ref * (torch.arange(TEXT_LEN)[None, :] < mask.sum(1)[:, None])[..., None]
    torch.testing.assert_close(encoders["wan"].encode(PROMPTS), ref, rtol=1e-5, atol=1e-5)


def test_encoding_runs_over_the_longest_prompt_and_matches_a_full_length_pass(encoders):
    # encode() runs the encoder over the batch's longest prompt, then zero-pads to text_len: the
    # same numbers as running all text_len positions (the padded keys are masked).
    enc = encoders["diffusers"]
    ids, mask = enc.tokenize(PROMPTS)
    assert ids.shape == (2, TEXT_LEN) and int(mask.sum(1).max()) < TEXT_LEN
    with torch.inference_mode():
        full = enc._model(input_ids=ids, attention_mask=mask).last_hidden_state
    full = full * mask[..., None]
    torch.testing.assert_close(enc.encode(PROMPTS), full, rtol=1e-6, atol=1e-6)
    short_ids, _ = enc.tokenize(PROMPTS, padding="longest")
    assert short_ids.shape[1] == int(mask.sum(1).max())


def test_the_unk_tokenizer_makes_each_unknown_word_one_token(tmp_path):
    from memrope.runtime.text import build_tiny_tokenizer

    unk = build_tiny_tokenizer(tmp_path / "unk", unknown_words="unk")
    letters = build_tiny_tokenizer(tmp_path / "letters")
    prompt = "A Red ball, gliding past quiet zebras."
    ids = unk(prompt)["input_ids"]
    assert unk.convert_ids_to_tokens(ids) == ["\u2581a", "\u2581red", "\u2581ball", ",", "<unk>", "<unk>",
                                              "<unk>", "<unk>", ".", "</s>"]
    assert unk("a red ball")["input_ids"] == unk("A RED Ball")["input_ids"]  # lowercased
    assert len(letters(prompt)["input_ids"]) > 2 * len(ids)  # unknown words spelled letter by letter
    with pytest.raises(ValueError, match="unknown_words must be one of"):
        build_tiny_tokenizer(tmp_path / "bad", unknown_words="drop")


def test_tokenizer_appends_eos_and_no_bos(encoders):
    ids, mask = encoders["wan"].tokenize(["a cat"])
    n = int(mask.sum())
    assert ids[0, n - 1] == 1 and ids[0, 0] != 1  # </s> last, nothing prepended
    assert (ids[0, n:] == 0).all()  # <pad>


def test_bf16_load_casts(tiny_dirs):
    enc = TextEncoder.from_model_dir(tiny_dirs["wan"], text_len=TEXT_LEN, dtype=torch.bfloat16)
    try:
        assert all(p.dtype == torch.bfloat16 for p in enc._model.parameters())
        out = enc.encode(PROMPTS)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
    finally:
        enc.close()
    assert enc.closed
    with pytest.raises(RuntimeError, match="closed"):
        enc.encode(PROMPTS)


def test_whitespace_cleaning(encoders):
    assert clean_prompt("  a  &amp;amp; b ") == "a & b"
    assert clean_prompt("x\n\t y") == "x y"
    assert clean_prompt("sch\u00c3\u00b6ner Fuchs") == "sch\u00f6ner Fuchs"  # ftfy repairs mojibake, as Wan's cleaning
    enc = encoders["diffusers"]
    assert torch.equal(enc.encode(["  a  &amp;amp; b "]), enc.encode(["a & b"]))
    assert not torch.equal(enc.encode(["a &amp; b"])[0], enc.encode(["a &amp;amp; c"])[0])


def test_long_prompt_is_truncated(encoders):
    out = encoders["wan"].encode(["the cat " * 200])
    assert out.shape == (1, TEXT_LEN, D_MODEL) and torch.isfinite(out).all()
    assert (out[0].abs().sum(-1) > 0).all()


def test_disk_cache(tmp_path, tiny_dirs):
    calls = []

    def factory():
        calls.append(1)
        return TextEncoder.from_model_dir(tiny_dirs["diffusers"], text_len=TEXT_LEN)

    key = f"{tiny_dirs['diffusers'].resolve()}:{TEXT_LEN}"
    cache = tmp_path / "cache"
    first = encode_cached(factory, PROMPTS, cache, key=key)
    assert len(calls) == 1 and first.shape == (2, TEXT_LEN, D_MODEL)
    assert len(list(cache.glob("*.safetensors"))) == 2
    assert not list(cache.glob("*.tmp")) and not list(cache.glob(".*.tmp"))
    second = encode_cached(factory, PROMPTS, cache, key=key)
    assert len(calls) == 1 and torch.equal(first, second)
    # one new prompt: one more encoder build, old entry reused, order kept
    third = encode_cached(factory, [PROMPTS[1], "a dog"], cache, key=key)
    assert len(calls) == 2 and torch.equal(third[0], first[1])
    # another key is another entry
    encode_cached(factory, PROMPTS[:1], cache, key=key + "-other")
    assert len(calls) == 3


def test_empty_folder_names_both_layouts(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        TextEncoder.from_model_dir(tmp_path)
    msg = str(err.value)
    for expected in ("text_encoder", "tokenizer", WAN_T5_CHECKPOINT, WAN_TOKENIZER_DIR):
        assert expected in msg


def test_wan_layout_without_tokenizer(tmp_path, tiny_dirs):
    folder = tmp_path / "wan"
    shutil.copytree(tiny_dirs["wan"], folder)
    shutil.rmtree(folder / "google")
    with pytest.raises(FileNotFoundError, match="google/umt5-xxl"):
        TextEncoder.from_model_dir(folder)


def test_a_config_json_that_is_not_utf8_is_named(tmp_path, tiny_dirs):
    folder = tmp_path / "wan"
    shutil.copytree(tiny_dirs["wan"], folder)
    config = folder / "config.json"
    config.write_bytes(config.read_bytes().replace(b"{", b'{"_note": "caf\xe9",', 1))
    with pytest.raises(ValueError, match=rf"model folder config {config} is not UTF-8 text \(byte 0xe9"):
        TextEncoder.from_model_dir(folder, text_len=TEXT_LEN)


def test_wrong_key_in_pth(tmp_path, tiny_dirs):
    folder = tmp_path / "wan"
    shutil.copytree(tiny_dirs["wan"], folder)
    state = torch.load(folder / WAN_T5_CHECKPOINT, weights_only=True)
    state["blocks.0.attn.qq.weight"] = state.pop("blocks.0.attn.q.weight")
    torch.save(state, folder / WAN_T5_CHECKPOINT)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qq\.weight"):
        TextEncoder.from_model_dir(folder, text_len=TEXT_LEN)
    del state["blocks.0.attn.qq.weight"]
    torch.save(state, folder / WAN_T5_CHECKPOINT)
    with pytest.raises(ValueError, match=r"encoder\.block\.0\.layer\.0\.SelfAttention\.q\.weight"):
        TextEncoder.from_model_dir(folder, text_len=TEXT_LEN)


def test_prompt_validation(encoders, tmp_path):
    enc = encoders["wan"]
    for bad in ("", "   \n\t "):
        with pytest.raises(ValueError, match=r"prompt is empty.*prompt 0"):
            enc.encode([bad])
    with pytest.raises(TypeError):
        enc.encode([None])
    with pytest.raises(TypeError):
        enc.encode("a bare string")
    with pytest.raises(ValueError, match=r"prompt is empty.*prompt 1"):
        encode_cached(lambda: pytest.fail("factory must not run"), ["a cat", " "], tmp_path, key="k")
