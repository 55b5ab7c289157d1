"""Model loading: the tiny builtin, local dirs, spec validation, and (slow) the reference model."""
import os

import pytest
import torch

from qat.assets import cache_dir
from qat.models import ModelSpec, load_model
from qat.models.tiny import tiny_tokenizer

TINY = ModelSpec(name="tiny")


def test_tiny_model_and_tokenizer_load_and_forward():
    model, tok = load_model(TINY)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (128, 2)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)
    assert len(tok) == model.config.vocab_size == 512
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    ids = tok("The river was brown after the rain.", return_tensors="pt")["input_ids"]  # (1, T)
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 512) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_tiny_weights_follow_the_seed_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, _ = load_model(TINY)
    assert torch.equal(torch.rand(3), expected)  # loading did not consume the caller's stream
    b, _ = load_model(TINY)
    c, _ = load_model(ModelSpec(name="tiny", seed=1))
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


@pytest.mark.parametrize("text", [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "line one\n\nline two\n\ttabbed",
    "naïve café, Zürich — 東京 😀",
    "",
])
def test_tiny_tokenizer_round_trips_any_text(text):
    tok = tiny_tokenizer(512)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.bos_token_id not in ids


def test_tiny_tokenizer_is_built_once_into_the_cache():
    tok = tiny_tokenizer(300)
    built = [d for d in (cache_dir() / "models").iterdir()
             if d.name.startswith("tiny-tokenizer-v300-")]
    assert len(built) == 1 and (built[0] / "tokenizer.json").is_file()
    stamp = os.stat(built[0] / "tokenizer.json").st_mtime_ns
    again = tiny_tokenizer(300)
    assert os.stat(built[0] / "tokenizer.json").st_mtime_ns == stamp
    assert len(tok) == len(again) == 300
    assert tok("the harbour")["input_ids"] == again("the harbour")["input_ids"]


def test_model_dtype_is_applied():
    model, _ = load_model(ModelSpec(name="tiny", dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_a_local_model_dir_loads_back_identically(tmp_path):
    model, tok = load_model(TINY)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    # path wins over name: the name here would otherwise load the 135M model
    loaded, tok2 = load_model(ModelSpec(name="smollm2-135m", path=str(tmp_path)))
    ids = torch.tensor([tok("A heron stood in the shallows.")["input_ids"]])
    assert tok2("A heron")["input_ids"] == tok("A heron")["input_ids"]
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_missing_model_path_names_the_field(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=r"model\.path.*nope"):
        load_model(ModelSpec(path=str(missing)))


@pytest.mark.parametrize("kwargs,field", [
    ({"dtype": "int8"}, "model.dtype"),
    ({"name": ""}, "model.name"),
    ({"path": ""}, "model.path"),
    ({"attn_implementation": "fast"}, "model.attn_implementation"),
    ({"hidden_size": 0}, "model.hidden_size"),
    ({"num_layers": -1}, "model.num_layers"),
    ({"hidden_size": 130}, "model.hidden_size"),
    ({"num_heads": 4, "num_kv_heads": 3}, "model.num_heads"),
    ({"vocab_size": 100}, "model.vocab_size"),
    ({"max_position_embeddings": 0}, "model.max_position_embeddings"),
])
def test_model_spec_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        ModelSpec(**kwargs)


def test_model_spec_is_frozen():
    with pytest.raises(AttributeError):
        TINY.name = "other"  # type: ignore[misc]


@pytest.mark.slow
def test_reference_model_matches_the_protocol():
    """Converts the GGUF (~50 s in a fresh cache), checks its shape, the wiki eval split and two
    protocol windows against a direct computation."""
    from qat.data.corpora import wiki_summaries_entries
    from qat.eval.perplexity import perplexity
    from qat.data import split_entries, tokenize

    model, tok = load_model(ModelSpec())
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (576, 30, 49152)
    assert model.dtype == torch.float32 and cfg.tie_word_embeddings
    again, _ = load_model(ModelSpec())  # from the cached safetensors dir now
    assert torch.equal(again.model.layers[3].mlp.down_proj.weight,
                       model.model.layers[3].mlp.down_proj.weight)

    _, held_out = split_entries(wiki_summaries_entries(), 0.05)
    ids = tokenize(tok, held_out)
    assert len(held_out) == 502 and ids.numel() == 55_252

    result = perplexity(model, ids, window=512, max_windows=2, batch_size=2)
    nll = 0.0
    with torch.no_grad():
        for w in ids[:1024].view(2, 512):
            logits = model(w[None]).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum").item()
    assert result.n_tokens == 1022 and result.n_windows == 2
    assert result.nll_sum == pytest.approx(nll, rel=1e-5)
    assert 5 < result.ppl < 40


def test_a_causal_decoder_passes_the_causality_check(tiny_llama):
    from qat.models.structure import check_causal

    check_causal(tiny_llama, "tiny")  # raises if it were not


def test_an_encoder_with_a_head_is_refused_as_not_causal():
    """Complete weights, so only the attention gives it away."""
    import pytest
    from transformers import BertConfig, BertLMHeadModel

    from qat.models.structure import check_causal

    model = BertLMHeadModel(BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=128)).eval()
    with pytest.raises(ValueError, match="not a causal decoder.*later tokens"):
        check_causal(model, "bert")
