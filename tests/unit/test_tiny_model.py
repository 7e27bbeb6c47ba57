"""The tiny offline Llama: files vLLM needs, idempotent reuse, refusal to overwrite, varied greedy output."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kvlane.integration.tiny_model import MARKER, build_tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "m")


def test_writes_config_weights_tokenizer_and_chat_template(model_dir):
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", MARKER} <= names
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["head_dim"] == 32 and cfg["num_hidden_layers"] == 2 and cfg["num_key_value_heads"] == 2
    assert 512 <= cfg["vocab_size"] <= 768
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert len(tok) == cfg["vocab_size"]
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<s><|user|>\nHi\n<|assistant|>\n"
    # byte-level BPE: any text round-trips, no unknown tokens
    s = "Grüße, 東京! x=1"
    assert tok.decode(tok(s).input_ids) == s


def test_same_params_reuse_other_params_refused(model_dir):
    before = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_llama(model_dir) == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match="other parameters"):
        build_tiny_llama(model_dir, seed=1)


def test_refuses_foreign_dir_and_bad_params(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "something").write_text("mine")
    with pytest.raises(FileExistsError, match="not a kvlane tiny model"):
        build_tiny_llama(tmp_path / "x")
    with pytest.raises(ValueError, match="head_dim=16"):
        build_tiny_llama(tmp_path / "y", head_dim=16)
    with pytest.raises(ValueError, match="kv_heads=3"):
        build_tiny_llama(tmp_path / "y", kv_heads=3)


def test_greedy_output_is_deterministic_varied_and_never_stops_early(model_dir):
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tok("The quick brown fox", return_tensors="pt").input_ids
    outs = [model.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:].tolist() for _ in range(2)]
    assert outs[0] == outs[1]
    assert len(outs[0]) == 32  # EOS is never the argmax
    assert len(set(outs[0])) >= 16  # not one token repeated
    assert tok.eos_token_id not in outs[0]
    assert "\ufffd" not in tok.decode(outs[0])


def test_concurrent_builders_of_the_same_model_both_succeed(tmp_path):
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: build_tiny_llama(tmp_path / "shared", layers=1), range(2)))
    assert results[0] == results[1] == (tmp_path / "shared").resolve()
    assert json.loads((tmp_path / "shared" / MARKER).read_text())["params"]["layers"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["shared"]  # no leftover temp directories
