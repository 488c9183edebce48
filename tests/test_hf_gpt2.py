"""Hugging Face GPT-2 import (from_hf, train.init_from) and export (to_hf, tyingrun-export), checked against
transformers itself on a small random GPT-2 built locally."""

import json

import pytest
import torch

from tyingrun import export
from tyingrun.config import ModelConfig
from tyingrun.errors import BadInput
from tyingrun.models.gpt2 import GPT2
from tyingrun.models.hf_gpt2 import from_hf, to_hf
from tyingrun.train.init_from import init_from
from tyingrun.tying import counts, maps

from .helpers import tiny_gpt2

transformers = pytest.importorskip("transformers")

VOCAB = 100


def perturb(model):
    """Move every weight off its init (zero biases, unit gains) so that a misplaced tensor shows in the logits."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in counts.unique_parameters(model.parameters()).values():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def gpt2(n_layer=4, max_positions=32, **model_keys):
    torch.manual_seed(0)
    return GPT2(ModelConfig(n_layer=n_layer, n_head=2, d_model=32, max_positions=max_positions, **model_keys), VOCAB)


def hf_gpt2(tie):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64,
                                     tie_word_embeddings=tie, bos_token_id=None, eos_token_id=None)
    return perturb(transformers.GPT2LMHeadModel(config)).eval()


def tokens(length=64):
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(1))


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def our_logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids)


@pytest.mark.parametrize("tie", [True, False])
def test_from_hf_reproduces_the_hugging_face_logits(tmp_path, tie):
    hf = hf_gpt2(tie)
    hf.save_pretrained(tmp_path)
    model = from_hf(tmp_path)
    assert model.tokens.tied == tie
    torch.testing.assert_close(our_logits(model, tokens()), hf_logits(hf, tokens()), rtol=0, atol=1e-5)


def test_from_hf_reads_a_file_saved_without_the_lm_head_wrapper(tmp_path):
    hf = hf_gpt2(tie=True)
    hf.transformer.save_pretrained(tmp_path)  # GPT2Model: names without "transformer.", as the hub's gpt2
    torch.testing.assert_close(our_logits(from_hf(tmp_path), tokens()), hf_logits(hf, tokens()), rtol=0, atol=1e-5)


@pytest.mark.parametrize("tie, bias", [(True, True), (False, True), (True, False)])
def test_to_hf_of_a_cyclic_model_loads_in_transformers_with_the_same_logits(tmp_path, tie, bias):
    model = gpt2(tie_embeddings=tie, bias=bias)
    model.stack.apply_map(maps.cyclic(4, 2))
    perturb(model)
    to_hf(model, tmp_path)
    hf, loading = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]
    assert (hf.lm_head.weight is hf.transformer.wte.weight) == tie
    ids = tokens(32)
    torch.testing.assert_close(hf_logits(hf.eval(), ids), our_logits(model, ids), rtol=0, atol=1e-5)


def test_init_from_a_hugging_face_folder_needs_the_same_shape(tmp_path):
    hf = hf_gpt2(tie=True)
    hf.save_pretrained(tmp_path)
    model = gpt2(n_layer=2, max_positions=64, tie_embeddings=False)
    init_from(model, tmp_path)
    assert not model.tokens.tied and torch.equal(model.tokens.lm_head.weight, hf.transformer.wte.weight)
    torch.testing.assert_close(our_logits(model, tokens()), hf_logits(hf, tokens()), rtol=0, atol=1e-5)
    with pytest.raises(BadInput, match="set model.n_layer=2 model.max_positions=64 model.vocab_size=100"):
        init_from(tiny_gpt2(), tmp_path)


def test_an_unsupported_hugging_face_config_is_refused_in_one_line(tmp_path):
    hf_gpt2(tie=True).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(BadInput, match='activation_function="relu" is not a GPT-2 that tyingrun builds'):
        from_hf(tmp_path)


@pytest.mark.slow
def test_export_writes_a_finished_run_as_a_hugging_face_folder(tmp_path, cyclic_gpt2_run):
    export.main([str(cyclic_gpt2_run), str(tmp_path / "hf")])
    model = export.load_run_model(cyclic_gpt2_run)
    assert model.stack.src == maps.cyclic(4, 2)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, model.tokens.wte.num_embeddings, (2, 32), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(hf_logits(hf, ids), our_logits(model, ids), rtol=0, atol=1e-5)


def test_export_of_a_folder_that_is_not_a_run_exits_2_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        export.main([str(tmp_path), str(tmp_path / "hf")])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
