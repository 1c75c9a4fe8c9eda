"""Prompt text -> ``prompt_embeds``: the umT5-XXL text encoder as Wan2.1 uses it (spec section 5.2).

Owns:

* :class:`TextEncoder`: loading the umT5 encoder and its tokenizer from a local folder, in either
  the Diffusers layout (``text_encoder/`` + ``tokenizer/``) or Wan's original layout
  (``models_t5_umt5-xxl-enc-bf16.pth`` + ``google/umt5-xxl/``, whose key names it converts to
  transformers' ``UMT5EncoderModel`` names), the 'whitespace' prompt cleaning, tokenisation
  (``padding='max_length'``, truncation, EOS appended, no BOS) and the zeroing of every position
  at or past the real token count (EOS included). Output ``[B, text_len, d_model]`` float32.
* :func:`encode_cached`: a disk cache of encoded prompts (one safetensors file per prompt, written
  atomically) so the multi-GB encoder is built only when a prompt has not been seen before.
* :class:`PromptEncoder`: the encoder kept open for a long-lived process (the server, the Python
  API), with an in-memory LRU of encoded prompts and token counts for admission checks.
* :func:`build_tiny_text_model`: a tiny, randomly initialised, download-free model folder in
  either layout, for demos and tests.

Nothing here downloads: every transformers call uses ``local_files_only=True``.
"""

from __future__ import annotations

import gc
import hashlib
import html
import json
import logging
import os
import re
import string
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from memrope.io import (
    atomic_path,
    atomic_write,
    read_safetensors,
    read_text,
    save_safetensors_atomic,
)

logger = logging.getLogger(__name__)

# Wan's original layout (spec 6.4) and the Diffusers layout of the same folder.
WAN_T5_CHECKPOINT = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_TOKENIZER_DIR = "google/umt5-xxl"
DIFFUSERS_ENCODER_DIR = "text_encoder"
DIFFUSERS_TOKENIZER_DIR = "tokenizer"
CONFIG_FILE = "config.json"
CACHE_TENSOR = "prompt_embeds"

# umT5-XXL encoder as Wan builds it (`wan/modules/t5.py: umt5_xxl`), in transformers' terms.
UMT5_XXL_ENCODER = dict(
    vocab_size=256384,
    d_model=4096,
    d_kv=64,
    num_heads=64,
    d_ff=10240,
    num_layers=24,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",  # transformers maps this to gelu_new = tanh approximation
    layer_norm_epsilon=1e-6,
    dropout_rate=0.0,
    is_encoder_decoder=False,
    use_cache=False,
)

# Attention exactly as Wan computes it: no 1/sqrt(d) scaling, position bias + additive padding
# mask, softmax in float32 (transformers' eager path runs the softmax in the model dtype).
ATTN_IMPLEMENTATION = "memrope_t5_fp32_softmax"


def _t5_attention_fp32_softmax(module, query, key, value, attention_mask, scaling=None,
                               dropout=0.0, position_bias=None, **kwargs):
    """``query/key/value`` ``[B, H, L, d_kv]`` -> (``[B, L, H, d_kv]``, weights ``[B, H, L, L]``)."""
    scores = torch.matmul(query, key.transpose(2, 3))
    if scaling is not None and scaling != 1.0:
        scores = scores * scaling
    if position_bias is not None:
        scores = scores + position_bias
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.softmax(scores.float(), dim=-1).type_as(scores)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        AttentionMaskInterface,
        eager_mask,
    )

    if ATTN_IMPLEMENTATION not in ALL_MASK_ATTENTION_FUNCTIONS.valid_keys():
        AttentionInterface.register(ATTN_IMPLEMENTATION, _t5_attention_fp32_softmax)
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)


# --------------------------------------------------------------------------------------------
# Prompt validation and cleaning
# --------------------------------------------------------------------------------------------

def clean_prompt(text: str) -> str:
    """Wan's 'whitespace' cleaning: ftfy fix, HTML-unescape twice, strip, collapse every
    whitespace run to one space, strip."""
    try:
        import ftfy
    except ImportError as exc:
        raise ImportError("prompt cleaning needs ftfy, as Wan's: pip install -e '.[video]'") from exc
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def validate_prompts(prompts: Sequence[str]) -> list[str]:
    """Check ``prompts`` is a non-empty list of non-blank strings; return them cleaned."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts is an empty list; expected at least one prompt")
    cleaned = []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompt {i} must be a str, got {type(prompt).__name__}")
        text = clean_prompt(prompt)
        if not text:
            raise ValueError(f"prompt is empty (or only whitespace after cleaning): prompt {i} = "
                             f"{prompt!r}; expected some text to encode")
        cleaned.append(text)
    return cleaned


# --------------------------------------------------------------------------------------------
# Wan <-> transformers key names
# --------------------------------------------------------------------------------------------

_WAN_TO_HF_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    # Wan: fc2(fc1(x) * gelu_tanh(gate(x))); transformers: wo(gelu_new(wi_0 x) * wi_1 x).
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_HF_TO_WAN_BLOCK = {hf: wan for wan, hf in _WAN_TO_HF_BLOCK.items()}
_WAN_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
_HF_BLOCK_KEY = re.compile(r"^encoder\.block\.(\d+)\.(.+)$")


def wan_to_hf_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wan ``T5Encoder`` key names -> transformers ``UMT5EncoderModel`` key names.

    ``token_embedding.weight`` ``[vocab, d_model]`` becomes both ``shared.weight`` and
    ``encoder.embed_tokens.weight`` (tied). A key Wan's encoder does not have -> ValueError.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state.items():
        match = _WAN_BLOCK_KEY.match(key)
        if key == "token_embedding.weight":
            out["shared.weight"] = tensor
            out["encoder.embed_tokens.weight"] = tensor
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = tensor
        elif match and match.group(2) in _WAN_TO_HF_BLOCK:
            out[f"encoder.block.{match.group(1)}.{_WAN_TO_HF_BLOCK[match.group(2)]}"] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unexpected keys in the Wan umT5 checkpoint: {sorted(unknown)}; expected "
                         "token_embedding.weight, norm.weight and blocks.{i}.{" +
                         ", ".join(_WAN_TO_HF_BLOCK) + "}")
    return out


def hf_to_wan_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`wan_to_hf_state_dict` (``encoder.embed_tokens.weight`` is dropped: it is
    the same tensor as ``shared.weight``)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = _HF_BLOCK_KEY.match(key)
        if key == "shared.weight":
            out["token_embedding.weight"] = tensor
        elif key == "encoder.embed_tokens.weight":
            continue
        elif key == "encoder.final_layer_norm.weight":
            out["norm.weight"] = tensor
        elif match and match.group(2) in _HF_TO_WAN_BLOCK:
            out[f"blocks.{match.group(1)}.{_HF_TO_WAN_BLOCK[match.group(2)]}"] = tensor
        else:
            raise ValueError(f"transformers UMT5EncoderModel key {key!r} has no Wan equivalent")
    return out


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def _expected_files_message(model_dir: Path) -> str:
    return (f"expected either the Diffusers layout ({model_dir}/{DIFFUSERS_ENCODER_DIR}/ with "
            f"config.json and model weights, plus {model_dir}/{DIFFUSERS_TOKENIZER_DIR}/) or Wan's "
            f"original layout ({model_dir}/{WAN_T5_CHECKPOINT} plus the tokenizer folder "
            f"{model_dir}/{WAN_TOKENIZER_DIR}/)")


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer in {path} has no pad or EOS token (pad={tokenizer.pad_token!r}, "
                         f"eos={tokenizer.eos_token!r}); expected the umT5 tokenizer ('<pad>', '</s>')")
    return tokenizer


def load_tokenizer(model_dir: str | os.PathLike[str]):
    """The umT5 tokenizer of a Wan2.1 folder (either layout), without the encoder's weights."""
    model_dir = Path(model_dir)
    for folder in (DIFFUSERS_TOKENIZER_DIR, WAN_TOKENIZER_DIR):
        if (model_dir / folder).is_dir():
            return _load_tokenizer(model_dir / folder)
    raise FileNotFoundError(f"no tokenizer in {model_dir}: " + _expected_files_message(model_dir))


def prompt_tokens(tokenizer, prompt: str) -> int:
    """Token count of one cleaned prompt as the encoder sees it (end-of-text included)."""
    return len(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def _umt5_config_for_wan(checkpoint: Path):
    """umT5-XXL encoder config, unless a transformers UMT5/T5 ``config.json`` sits beside the
    checkpoint. A ``config.json`` of another kind (the DiT's, in a Wan2.1 folder) is ignored."""
    from transformers import UMT5Config

    config_path = checkpoint.parent / CONFIG_FILE
    if config_path.is_file():
        try:
            raw = json.loads(read_text(config_path, "model folder config"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{config_path} is not valid JSON: {exc}") from None
        if isinstance(raw, dict) and raw.get("model_type") in ("umt5", "t5"):
            logger.info("umT5 sizes from %s", config_path)
            config = UMT5Config.from_dict({k: v for k, v in raw.items() if k != "model_type"})
            config.is_encoder_decoder = False
            config.use_cache = False
            config.dropout_rate = 0.0
            return config
        logger.debug("%s is not a umT5 config (model_type %r); using umT5-XXL sizes", config_path,
                     raw.get("model_type") if isinstance(raw, dict) else None)
    return UMT5Config(**UMT5_XXL_ENCODER)


def load_wan_t5_checkpoint(checkpoint: Path, *, dtype: torch.dtype = torch.float32):
    """Build a ``UMT5EncoderModel`` from Wan's ``models_t5_umt5-xxl-enc-bf16.pth`` (key names
    converted, loaded strictly, cast to ``dtype``). The model is built on the meta device, so
    only the checkpoint's tensors (memory-mapped) and their ``dtype`` copies use memory."""
    from transformers import UMT5EncoderModel

    config = _umt5_config_for_wan(checkpoint)
    config._attn_implementation = ATTN_IMPLEMENTATION
    try:
        state = torch.load(str(checkpoint), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise ValueError(f"umT5 checkpoint {checkpoint} could not be read by torch.load: {exc}") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"umT5 checkpoint {checkpoint} must hold a flat dict of tensors "
                         "(Wan's T5Encoder.state_dict()), got "
                         f"{type(state).__name__}")
    hf_state = wan_to_hf_state_dict(state)

    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(hf_state))
    unexpected = sorted(set(hf_state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"umT5 checkpoint {checkpoint} does not match a {config.num_layers}-layer "
                         f"umT5 encoder: missing (transformers names) {missing}, unexpected "
                         f"{unexpected}")
    wrong = [f"{k}: {list(hf_state[k].shape)} != {list(s)}" for k, s in expected.items()
             if hf_state[k].shape != s]
    if wrong:
        raise ValueError(f"umT5 checkpoint {checkpoint} has tensors of the wrong shape for config "
                         f"(d_model={config.d_model}, vocab={config.vocab_size}): {wrong}")
    cast = {k: v.to(dtype) for k, v in hf_state.items()}
    # Tied embedding: give both names the same tensor so they stay one parameter.
    cast["encoder.embed_tokens.weight"] = cast["shared.weight"]
    model.load_state_dict(cast, strict=True, assign=True)
    del state, hf_state
    return model


class TextEncoder:
    """umT5 encoder + tokenizer. ``encode(prompts)`` -> float32 ``[B, text_len, d_model]`` on the
    CPU, with every position at or past the real token count (EOS included) set to exactly 0.

    Encode once per prompt, then :meth:`close` to free the encoder if memory is tight.
    """

    def __init__(self, model, tokenizer, *, text_len: int = 512, device: str | torch.device = "cpu",
                 name: str = "umt5"):
        if not isinstance(text_len, int) or text_len < 1:
            raise ValueError(f"text_len must be a positive int, got {text_len!r}")
        vocab = model.config.vocab_size
        if len(tokenizer) > vocab:
            raise ValueError(f"{name}: tokenizer has {len(tokenizer)} tokens but the encoder's "
                             f"embedding has only {vocab} rows")
        self._model = model.eval().to(device)
        self._tokenizer = tokenizer
        self.text_len = text_len
        self.device = torch.device(device)
        self.d_model = int(model.config.d_model)
        self.name = name

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike[str], *, text_len: int = 512,
                       device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> TextEncoder:
        """Load from a Wan2.1 folder (Diffusers or Wan's original layout; see the module doc)."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"text encoder folder not found: {model_dir}; "
                                    + _expected_files_message(model_dir))
        _register_attention()
        encoder_dir = model_dir / DIFFUSERS_ENCODER_DIR
        checkpoint = model_dir / WAN_T5_CHECKPOINT
        if encoder_dir.is_dir():
            tokenizer_dir = model_dir / DIFFUSERS_TOKENIZER_DIR
            if not tokenizer_dir.is_dir():
                raise FileNotFoundError(f"{model_dir} has {DIFFUSERS_ENCODER_DIR}/ (Diffusers layout) "
                                        f"but no tokenizer folder {tokenizer_dir}/")
            if not (encoder_dir / CONFIG_FILE).is_file():
                raise FileNotFoundError(f"Diffusers text encoder folder {encoder_dir} has no "
                                        f"{CONFIG_FILE}; expected config.json and model weights")
            from transformers import UMT5EncoderModel

            logger.info("loading umT5 encoder (Diffusers layout) from %s", encoder_dir)
            try:
                model = UMT5EncoderModel.from_pretrained(
                    str(encoder_dir), local_files_only=True, dtype=dtype,
                    attn_implementation=ATTN_IMPLEMENTATION)
            except OSError as exc:
                raise FileNotFoundError(f"could not load the text encoder from {encoder_dir}: "
                                        f"{exc}") from None
            model = model.to(dtype)  # whole model in dtype, as Wan runs it (no fp32 `wo`)
            tokenizer = _load_tokenizer(tokenizer_dir)
        elif checkpoint.is_file():
            tokenizer_dir = model_dir / WAN_TOKENIZER_DIR
            if not tokenizer_dir.is_dir():
                raise FileNotFoundError(f"{model_dir} has {WAN_T5_CHECKPOINT} (Wan layout) but no "
                                        f"tokenizer folder {WAN_TOKENIZER_DIR}/ ({tokenizer_dir})")
            logger.info("loading umT5 encoder (Wan layout) from %s", checkpoint)
            model = load_wan_t5_checkpoint(checkpoint, dtype=dtype)
            tokenizer = _load_tokenizer(tokenizer_dir)
        else:
            raise FileNotFoundError(f"no text encoder in {model_dir}: "
                                    + _expected_files_message(model_dir))
        return cls(model, tokenizer, text_len=text_len, device=device, name=str(model_dir))

    def tokenize(self, prompts: Sequence[str], *, padding: str = "max_length") -> tuple[torch.Tensor, torch.Tensor]:
        """Cleaned, tokenised prompts: ids and mask, both int64 ``[B, text_len]`` (``[B, longest]``,
        at most ``text_len``, with ``padding='longest'``)."""
        self._check_open()
        batch = self._tokenizer(validate_prompts(prompts), padding=padding,
                                max_length=self.text_len, truncation=True,
                                add_special_tokens=True, return_attention_mask=True,
                                return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"]

    @torch.inference_mode()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """``prompts`` (B strings) -> float32 ``[B, text_len, d_model]`` on the CPU.

        The encoder runs over the batch's longest prompt only, not all ``text_len`` positions (a
        100-token prompt costs 100 positions, not Wan's 512): padded keys are masked, so the real
        positions' outputs do not depend on how many pads follow, and the rows past each prompt's
        length are zero either way.
        """
        ids, mask = self.tokenize(prompts, padding="longest")
        hidden = self._model(input_ids=ids.to(self.device),
                             attention_mask=mask.to(self.device)).last_hidden_state
        hidden = hidden.float().cpu()
        lengths = mask.sum(1)  # real tokens, EOS included
        pad = torch.arange(hidden.shape[1])[None, :] >= lengths[:, None]
        hidden = hidden.masked_fill(pad[..., None], 0.0)
        return torch.nn.functional.pad(hidden, (0, 0, 0, self.text_len - hidden.shape[1]))

    def close(self) -> None:
        """Free the encoder's weights (the tokenizer goes too). ``encode`` fails afterwards."""
        if self._model is None:
            return
        self._model = None
        self._tokenizer = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        logger.debug("text encoder %s closed", self.name)

    @property
    def closed(self) -> bool:
        return self._model is None

    def _check_open(self) -> None:
        if self._model is None:
            raise RuntimeError(f"text encoder {self.name} was closed; create a new one to encode")

    def __enter__(self) -> TextEncoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Disk cache
# --------------------------------------------------------------------------------------------

def cache_file(cache_dir: str | os.PathLike[str], key: str, prompt: str) -> Path:
    """``cache_dir/<sha256(key, prompt)>.safetensors`` (key and prompt separated by a NUL)."""
    digest = hashlib.sha256(key.encode("utf-8") + b"\0" + prompt.encode("utf-8")).hexdigest()
    return Path(cache_dir) / f"{digest}.safetensors"


def encode_cached(encoder_factory: Callable[[], TextEncoder], prompts: Sequence[str],
                  cache_dir: str | os.PathLike[str], *, key: str) -> torch.Tensor:
    """Encoded ``prompts`` -> float32 ``[B, text_len, d_model]``, from the cache when possible.

    ``key`` names the encoder (e.g. its resolved model folder and text_len): the same prompt
    under another key is another entry. Each prompt is one file holding ``prompt_embeds``
    ``[1, text_len, d_model]`` (usable as ``--text-embeds``). On any miss the encoder is built
    once by ``encoder_factory``, encodes all missing prompts in one batch, and is closed.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"cache key must be a non-empty string naming the encoder, got {key!r}")
    cleaned = validate_prompts(prompts)
    paths = [cache_file(cache_dir, key, p) for p in cleaned]
    found: dict[int, torch.Tensor] = {}
    for i, path in enumerate(paths):
        if not path.is_file():
            continue
        try:
            tensor = read_safetensors(path, "cached text embeddings")[CACHE_TENSOR]
        except (ValueError, KeyError) as exc:
            logger.warning("ignoring unreadable text-embedding cache file %s (%s)", path, exc)
            continue
        if tensor.ndim != 3 or tensor.shape[0] != 1:
            logger.warning("ignoring cache file %s: prompt_embeds has shape %s, expected "
                           "[1, text_len, d_model]", path, list(tensor.shape))
            continue
        found[i] = tensor.float()
    missing = [i for i in range(len(prompts)) if i not in found]
    if missing:
        logger.info("encoding %d of %d prompts (cache misses in %s)", len(missing), len(prompts),
                    cache_dir)
        encoder = encoder_factory()
        try:
            embeds = encoder.encode([prompts[i] for i in missing])
        finally:
            encoder.close()
        for row, i in enumerate(missing):
            found[i] = embeds[row:row + 1].clone()
            save_safetensors_atomic({CACHE_TENSOR: found[i]}, paths[i],
                                    metadata={"encoder_key": key, "prompt": prompts[i]})
    shapes = {tuple(t.shape) for t in found.values()}
    if len(shapes) != 1:
        raise ValueError(f"cached text embeddings under key {key!r} disagree in shape: "
                         f"{sorted(shapes)}; delete {cache_dir} and encode again")
    return torch.cat([found[i] for i in range(len(prompts))], dim=0)


# --------------------------------------------------------------------------------------------
# Tiny download-free model
# --------------------------------------------------------------------------------------------

_TINY_WORDS = ["a", "an", "the", "and", "of", "in", "on", "at", "with", "to", "is", "are", "from", "by", "for",
               "over", "under", "into", "through", "near", "cat", "dog", "bird", "fish", "horse", "person", "man",
               "woman", "child", "car", "boat", "train", "city", "street", "forest", "river", "sea", "sky", "sun",
               "moon", "night", "day", "rain", "snow", "light", "fire", "water", "tree", "flower", "mountain",
               "road", "house", "red", "blue", "green", "yellow", "black", "white", "small", "big", "slow", "fast",
               "old", "young", "happy", "runs", "walks", "flies", "swims", "jumps", "sits", "looks", "camera",
               "video", "shot", "scene", "view", "close", "wide", "fox", "trotting", "fresh", "dawn", "stops",
               # The demo world's words (memrope.runtime.demo.world), so its prompts are ~13 tokens,
               # not ~43 spelled letter by letter: shapes, colours, motions, speeds, backgrounds.
               "ball", "balls", "circle", "disc", "dot", "square", "box", "block", "triangle", "gray", "grey",
               "left", "right", "up", "down", "moving", "moves", "move", "bouncing", "bounces", "around",
               "still", "standing", "resting", "sitting", "stationary", "rising", "rises", "falling", "falls",
               "sinks", "drifts", "drifting", "slides", "slowly", "quickly", "gently", "rapidly", "background",
               "backdrop", "walls", "off", "that", "plain", "against", "travelling", "floating", "sinking", "staying",
               "leftwards", "rightwards", "upwards", "downwards", "diagonally", "frame", "front", "quick"]


UNKNOWN_WORDS = ("letters", "unk")


def build_tiny_tokenizer(directory: str | os.PathLike[str], *, unknown_words: str = "letters"):
    """Write (``save_pretrained``) and return a small umT5-like tokenizer built in code.

    A Unigram model (sentencepiece's algorithm) over ``<pad>``=0, ``</s>``=1, ``<unk>``=2, the
    digits, the punctuation and ~140 lowercase words (``_TINY_WORDS``), with a Metaspace
    pre-tokenizer and a post-processor appending ``</s>`` (no BOS), like ``google/umt5-xxl``.

    ``unknown_words`` says what a word outside the list becomes:
    - ``'letters'``: spelled with letter pieces (cased; the letters and ``▁`` are pieces), so
      different unknown words embed differently;
    - ``'unk'``: one ``<unk>`` (the text is lowercased first, and there are no letter pieces), so a
      prompt costs about one token per word: a 111-word paragraph in LongLive's style is 136 tokens.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if unknown_words not in UNKNOWN_WORDS:
        raise ValueError(f"unknown_words must be one of {UNKNOWN_WORDS}, got {unknown_words!r}")
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    chars = string.digits + string.punctuation
    if unknown_words == "letters":
        chars = "\u2581" + string.ascii_lowercase + string.ascii_uppercase + chars
    pieces += [(c, -8.0) for c in chars]
    pieces += [("\u2581" + w, -4.0) for w in _TINY_WORDS]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    if unknown_words == "unk":
        backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                        eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def build_tiny_text_model(directory: str | os.PathLike[str], *, layout: str = "diffusers",
                          d_model: int = 32, text_len: int = 16, seed: int = 0,
                          unknown_words: str = "letters") -> Path:
    """Write a complete tiny text-encoder folder that :meth:`TextEncoder.from_model_dir` loads.

    THE WEIGHTS ARE RANDOM (seeded): the embeddings mean nothing; this exists for demos and tests
    only. The model is a 2-layer, 2-head (d_kv 16), d_ff 64, gated-gelu ``UMT5EncoderModel`` of
    width ``d_model`` (32 matches the tiny DiT's text_dim), vocabulary = the tiny tokenizer's.

    ``layout='diffusers'``: ``text_encoder/`` (config.json + model.safetensors) + ``tokenizer/``.
    ``layout='wan'``: ``models_t5_umt5-xxl-enc-bf16.pth`` (Wan key names, float32) with a
    transformers UMT5 ``config.json`` beside it, and the tokenizer in ``google/umt5-xxl/``.
    ``text_len`` is recorded in ``text_encoder_info.json``; it does not change the weights.
    ``unknown_words``: see :func:`build_tiny_tokenizer` (it sets the vocabulary, so the weights).
    """
    from transformers import UMT5Config, UMT5EncoderModel

    if layout not in ("diffusers", "wan"):
        raise ValueError(f"layout must be 'diffusers' or 'wan', got {layout!r}")
    if d_model < 2 or d_model % 2:
        raise ValueError(f"d_model must be an even int >= 2, got {d_model!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok_dir = directory / (DIFFUSERS_TOKENIZER_DIR if layout == "diffusers" else WAN_TOKENIZER_DIR)
    tokenizer = build_tiny_tokenizer(tok_dir, unknown_words=unknown_words)

    config = UMT5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // 2, num_heads=2,
                        d_ff=2 * d_model, num_layers=2, relative_attention_num_buckets=32,
                        relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                        layer_norm_epsilon=1e-6, dropout_rate=0.0, is_encoder_decoder=False,
                        use_cache=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = UMT5EncoderModel(config).eval()
        with torch.no_grad():  # T5 init leaves norms at 1; perturb them so the test sees them
            for name, param in model.named_parameters():
                if name.endswith("layer_norm.weight"):
                    param.add_(0.1 * torch.randn_like(param))
    finally:
        torch.random.set_rng_state(generator_state)

    if layout == "diffusers":
        model.save_pretrained(str(directory / DIFFUSERS_ENCODER_DIR))
    else:
        config_path = directory / CONFIG_FILE
        if config_path.is_file():
            raw = json.loads(config_path.read_text())
            if not (isinstance(raw, dict) and raw.get("model_type") in ("umt5", "t5")):
                raise ValueError(f"{config_path} exists and is not a umT5 config (the DiT's?); "
                                 "build the tiny Wan-layout text model in its own folder")
        state = {k: v.detach().clone().contiguous()
                 for k, v in hf_to_wan_state_dict(model.state_dict()).items()}
        with atomic_path(directory / WAN_T5_CHECKPOINT) as tmp:
            torch.save(state, str(tmp))
        atomic_write(config_path, config.to_json_string())
    atomic_write(directory / "text_encoder_info.json",
                 json.dumps({"layout": layout, "d_model": d_model, "text_len": text_len, "seed": seed,
                             "unknown_words": unknown_words, "random_weights": True}, indent=2) + "\n")
    logger.info("wrote a tiny random-weight text encoder (%s layout, d_model %d) to %s",
                layout, d_model, directory)
    return directory


class PromptEncoder:
    """umT5 prompts -> ``[B, text_len, D]`` embeddings, with the encoder loaded once.

    A server cannot reload a multi-GB encoder on every prompt change (``memrope.runtime.text.encode_cached``
    builds and closes one per miss, which suits the one-shot CLI), so this keeps it open and keeps
    the last ``capacity`` prompts' embeddings in memory. :meth:`check` counts tokens on a second
    tokenizer instance so request handlers can check lengths while the encoder thread encodes
    (a fast tokenizer is not safe to share across threads while it pads and truncates).
    """

    def __init__(self, encoder, tokenizer, *, text_len: int, batch: int = 1, capacity: int = 64):
        self._encoder = encoder
        self._tokenizer = tokenizer
        self.text_len = text_len
        self.batch = batch
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()  # encode() may be called from more than one thread

    @classmethod
    def from_model_dir(cls, model_dir: Path, *, text_len: int, text_dim: int, batch: int = 1) -> PromptEncoder:
        encoder = TextEncoder.from_model_dir(model_dir, text_len=text_len)
        if encoder.d_model != text_dim:
            raise ValueError(f"the text encoder in {model_dir} gives {encoder.d_model}-wide embeddings; the DiT "
                             f"takes text_dim={text_dim}")
        return cls(encoder, load_tokenizer(model_dir), text_len=text_len, batch=batch)

    def check(self, prompt: str, *, truncate: bool = False) -> str:
        """The cleaned prompt; TypeError if it is not a string, ValueError if it is empty or (unless
        ``truncate``: then a warning says what is dropped, as Wan truncates) longer than
        ``text_len`` tokens."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        cleaned = validate_prompts([prompt])[0]
        tokens = prompt_tokens(self._tokenizer, cleaned)
        if tokens > self.text_len:
            if not truncate:
                raise ValueError(f"prompt is {tokens} tokens long (end-of-text included); this model takes at "
                                 f"most text_len={self.text_len} tokens: shorten it")
            logger.warning("prompt %r is %d tokens long (end-of-text included); the model reads the first "
                           "text_len=%d and drops the rest", cleaned if len(cleaned) <= 60 else cleaned[:57] + "...",
                           tokens, self.text_len)
        return cleaned

    def encode(self, prompt: str) -> torch.Tensor:
        """``[B, text_len, D]`` float32 embeddings of ``prompt`` (one row per sample)."""
        with self._lock:
            embeds = self._cache.get(prompt)
            if embeds is None:
                embeds = self._encoder.encode([prompt])
                self._cache[prompt] = embeds
                if len(self._cache) > self._capacity:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(prompt)
        return embeds.expand(self.batch, -1, -1)

    def close(self) -> None:
        self._encoder.close()
        self._cache.clear()
