"""The float perplexity's cache key: a model loaded from a directory is named by its files (not
re-read and hashed), one built in memory by its weights."""
import os

import torch

from qat.eval.stage import fingerprint, model_files
from qat.models import ModelSpec, load_model


def test_a_directory_model_is_keyed_on_its_files(tmp_path):
    model, tok = load_model(ModelSpec(name="tiny"))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    blocks = torch.arange(64).view(2, 32)
    loaded = load_model(ModelSpec(path=str(tmp_path / "m")))[0]
    assert [p.name for p in model_files(loaded)] == ["model.safetensors"]
    first = fingerprint(loaded, blocks)
    assert fingerprint(load_model(ModelSpec(path=str(tmp_path / "m")))[0], blocks) == first
    assert fingerprint(loaded, blocks + 1) != first  # other eval tokens
    weights = tmp_path / "m" / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert fingerprint(loaded, blocks) != first  # rewritten weights: measured again


def test_an_in_memory_model_is_keyed_on_its_weights():
    model, _ = load_model(ModelSpec(name="tiny"))
    blocks = torch.arange(64).view(2, 32)
    assert model_files(model) == []
    first = fingerprint(model, blocks)
    with torch.no_grad():
        model.model.norm.weight[0] += 1
    assert fingerprint(model, blocks) != first
