"""Model loading: transformers directories, the embedded GGUF and its converted cache."""

from __future__ import annotations

import pytest
import torch

from streaming_core import loader
from streaming_core.batch import BatchPlan, SeqChunk
from streaming_core.loader import load_model, resolve_device_dtype

from .helpers import make_runner, stream_logits, tiny_llama


def test_resolve_device_dtype():
    assert resolve_device_dtype("cpu", "auto") == (torch.device("cpu"), torch.float32)
    assert resolve_device_dtype("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    dev, _ = resolve_device_dtype("auto", "float16")
    assert dev.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="dtype"):
        resolve_device_dtype("cpu", "int8")


def test_transformers_dir_matches_transformers(tmp_path):
    hf = tiny_llama(seed=5)
    hf.save_pretrained(tmp_path / "tiny")
    loaded = load_model(
        str(tmp_path / "tiny"), dtype=torch.float32, device="cpu", keep_hf=True, weights="dense"
    )
    assert loaded.name == "tiny" and loaded.hf_model is not None and loaded.tokenizer is None
    tokens = torch.randint(0, 128, (20,), generator=torch.Generator().manual_seed(0))
    expected = hf(tokens[None]).logits[0]
    got = stream_logits(make_runner(loaded.model, 4, 28), tokens.tolist(), chunk=5)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_unknown_source(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model(str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError):
        load_model(str(tmp_path / "missing.gguf"))


@pytest.mark.slow
def test_default_gguf_cache(tmp_path, monkeypatch):
    first = load_model("default", device="cpu", data_dir=tmp_path, keep_hf=True, weights="dense")
    cached = list((tmp_path / "models").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.safetensors").is_file()
    assert not (cached[0] / "config.json").read_text().count("quantization_config")

    def no_gguf(path):
        raise AssertionError("the second load must read the converted cache, not the GGUF file")

    monkeypatch.setattr(loader, "load_gguf_hf", no_gguf)
    second = load_model("default", device="cpu", data_dir=tmp_path, weights="dense")
    assert second.name == "SmolLM2-135M-Instruct" and second.hf_model is None
    ids = first.tokenizer("The attention sink keeps the first tokens.")["input_ids"]
    assert second.tokenizer("The attention sink keeps the first tokens.")["input_ids"] == ids
    with torch.no_grad():
        expected = first.hf_model(torch.tensor([ids])).logits[0]  # the GGUF-loaded transformers model
    got = stream_logits(make_runner(second.model, 4, 60, num_slots=1), ids, chunk=len(ids))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_default_greedy_chat_matches_generate():
    loaded = load_model("default", device="cpu", keep_hf=True, weights="dense")
    tok = loaded.tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ref = loaded.hf_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids) :]
    assert len(ref) > 4
    runner = make_runner(loaded.model, 4, 508, num_slots=1)
    logits = runner.run(BatchPlan((SeqChunk(0, 0, tuple(ids), "last"),))).logits[0]
    out: list[int] = []
    while len(out) < len(ref):
        out.append(int(logits[-1].argmax()))
        step = SeqChunk(0, len(ids) + len(out) - 1, (out[-1],), "last")
        logits = runner.run(BatchPlan((step,))).logits[0]
    assert out == ref.tolist(), (tok.decode(out), tok.decode(ref))
