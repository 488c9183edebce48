"""model.pad_vocab_to: padded embedding and head rows that take no probability mass, no gradient from the loss, no
place in the parameter counts, and that tyingrun-export trims and train.init_from of a Hugging Face folder restores
(logit parity with transformers, GPT-2 and Llama)."""

import pytest
import torch

from tyingrun.config import ModelConfig
from tyingrun.models import hf_gpt2, hf_llama
from tyingrun.models.bert import BERT
from tyingrun.models.gpt2 import GPT2
from tyingrun.models.llama import Llama
from tyingrun.train.init_from import init_from
from tyingrun.tying import counts, maps

from .helpers import lm_batch, mlm_batch

VOCAB = 100


def gpt2(pad_to, tie=True):
    torch.manual_seed(0)
    return GPT2(ModelConfig(n_layer=2, n_head=2, d_model=32, max_positions=32, tie_embeddings=tie,
                            pad_vocab_to=pad_to), VOCAB)


@pytest.mark.parametrize("tie", [True, False])
def test_padding_rows_take_no_probability_and_no_gradient(tie):
    model = gpt2(64, tie)
    assert model.tokens.wte.num_embeddings == 128 and model.tokens.lm_head.weight.shape[0] == 128
    batch = lm_batch(vocab=VOCAB)
    logits = model(batch["input_ids"])
    assert torch.isneginf(logits[..., VOCAB:]).all() and torch.isfinite(logits[..., :VOCAB]).all()
    assert torch.softmax(logits, -1)[..., VOCAB:].sum() == 0
    model.loss(batch).loss.backward()
    for weight in (model.tokens.wte.weight, model.tokens.lm_head.weight):
        assert weight.grad[VOCAB:].abs().max() == 0 and weight.grad[:VOCAB].abs().max() > 0


@pytest.mark.parametrize("tie", [True, False])
def test_the_loss_and_the_counts_are_those_of_the_unpadded_model(tie):
    padded, plain = gpt2(64, tie), gpt2(1, tie)
    padded_state = padded.state_dict()
    with torch.no_grad():
        for name, value in plain.state_dict().items():
            padded_state[name][:len(value)] = value
    batch = lm_batch(vocab=VOCAB)
    torch.testing.assert_close(padded.loss(batch).loss, plain.loss(batch).loss, rtol=0, atol=1e-6)
    for count in (counts.stored_params, counts.trainable_params, counts.total_params):
        assert count(padded) == count(plain)
    padded.tokens.wte.weight.requires_grad_(False)
    plain.tokens.wte.weight.requires_grad_(False)
    assert counts.trainable_params(padded) == counts.trainable_params(plain)


def test_bert_pads_its_head_bias_and_masks_the_padding():
    torch.manual_seed(0)
    model = BERT(ModelConfig(name="bert", n_layer=2, n_head=2, d_model=32, max_positions=32, pad_vocab_to=64), 64 + 5)
    assert model.head_bias.shape[0] == 128
    batch = mlm_batch(vocab=69)
    assert torch.isneginf(model(batch["input_ids"])[..., 69:]).all()
    assert torch.isfinite(model.loss(batch).loss)


def llama(pad_to, tie=True):
    torch.manual_seed(0)
    return Llama(ModelConfig(name="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=48, max_positions=32,
                             tie_embeddings=tie, pad_vocab_to=pad_to), VOCAB)


EXPORTS = {"gpt2": (gpt2, hf_gpt2.to_hf), "llama": (llama, hf_llama.to_hf)}


@pytest.mark.parametrize("family", sorted(EXPORTS))
@pytest.mark.parametrize("tie", [True, False])
def test_export_trims_the_padding_and_transformers_gives_the_same_logits(tmp_path, family, tie):
    transformers = pytest.importorskip("transformers")
    build, to_hf = EXPORTS[family]
    model = build(64, tie)
    assert model.tokens.wte.num_embeddings == 128
    model.stack.apply_map(maps.cyclic(2, 1))
    to_hf(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.vocab_size == VOCAB
    ids = lm_batch(vocab=VOCAB)["input_ids"]
    with torch.no_grad():
        ours = model.eval()(ids)[..., :VOCAB]
        torch.testing.assert_close(hf(ids).logits, ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", sorted(EXPORTS))
def test_a_hugging_face_folder_starts_a_padded_model_with_its_logits(tmp_path, family):
    pytest.importorskip("transformers")
    build, to_hf = EXPORTS[family]
    source = build(1)
    to_hf(source, tmp_path)
    model = build(64)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_()  # nothing of the model's own initialisation survives the import
    init_from(model, tmp_path)
    ids = lm_batch(vocab=VOCAB)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids)[..., :VOCAB], source.eval()(ids), rtol=0, atol=1e-6)
