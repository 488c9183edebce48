"""BERT: masked-LM batches, the loss over masked positions only, WordPiece data, causal mode, a full run."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from tyingrun.config import Config, DatasetConfig, HardwareConfig, LogConfig, ModelConfig, PolicyConfig, TrainConfig
from tyingrun.contracts import IGNORE_INDEX
from tyingrun.data.lm import BlockSampler, MaskedLM, eval_batches
from tyingrun.data.sampling import TransformedSampler
from tyingrun.data.tokenizer import EOS, MASK, SEP, train_bpe
from tyingrun.errors import BadInput
from tyingrun.models.bert import BERT
from tyingrun.run import build_data

from .helpers import SUMMARY_KEYS, compose_and_run, lm_batch, mlm_batch, tiny_bert

VOCAB = 1000
SPECIAL = torch.tensor([0, 1, 2, 3, 4])
MASKING = MaskedLM(mask_id=4, vocab_size=VOCAB, special_ids=SPECIAL)


def test_masking_statistics_on_a_large_batch():
    ids = torch.randint(5, VOCAB, (256, 512), generator=torch.Generator().manual_seed(0))
    batch = MASKING({"input_ids": ids, "labels": ids}, torch.Generator().manual_seed(1))
    chosen = batch["labels"] != IGNORE_INDEX
    assert chosen.float().mean().item() == pytest.approx(0.15, abs=0.01)
    assert torch.equal(batch["labels"][chosen], ids[chosen])
    assert torch.equal(batch["input_ids"][~chosen], ids[~chosen])
    corrupted = batch["input_ids"][chosen]
    as_mask = (corrupted == 4).float().mean().item()
    kept = (corrupted == ids[chosen]).float().mean().item()
    assert as_mask == pytest.approx(0.8, abs=0.02)
    assert kept == pytest.approx(0.1, abs=0.02)
    assert 1 - as_mask - kept == pytest.approx(0.1, abs=0.02)


def test_special_tokens_are_never_masked():
    ids = torch.randint(0, 8, (64, 64), generator=torch.Generator().manual_seed(0))
    batch = MASKING({"input_ids": ids, "labels": ids}, torch.Generator().manual_seed(1))
    assert not torch.isin(batch["labels"], SPECIAL).any()


def test_masked_sampler_resumes_with_the_same_masks():
    blocks = torch.arange(40 * 9).view(40, 9) + 5

    def sampler():
        return TransformedSampler(BlockSampler(blocks, batch_size=4, seed=0), MASKING, seed=3)

    original = sampler()
    for _ in range(7):
        original.next_batch()
    resumed = sampler()
    resumed.load_state_dict(original.state_dict())
    for _ in range(5):
        expected, got = original.next_batch(), resumed.next_batch()
        assert all(torch.equal(expected[key], got[key]) for key in ("input_ids", "labels"))


def test_mlm_loss_counts_only_masked_positions():
    model = tiny_bert().eval()
    batch = mlm_batch()
    masked = batch["labels"] != IGNORE_INDEX
    result = model.loss(batch)
    assert result.n_items == int(masked.sum()) < masked.numel()
    logits = model(batch["input_ids"])
    # Whatever the logits at the unmasked positions, the loss is the cross-entropy at the masked ones.
    scrambled = torch.where(masked[..., None], logits, 100 * torch.randn_like(logits))
    expected = F.cross_entropy(scrambled.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(result.loss, expected)


def test_causal_bert_sees_only_the_past():
    ids = lm_batch()["input_ids"]
    later_changed = ids.clone()
    later_changed[:, -1] = (ids[:, -1] + 1) % 64
    causal, bidirectional = tiny_bert(causal=True).eval(), tiny_bert().eval()
    torch.testing.assert_close(causal(ids)[:, :-1], causal(later_changed)[:, :-1])
    assert not torch.allclose(bidirectional(ids)[:, :-1], bidirectional(later_changed)[:, :-1])


def test_decoder_is_the_token_embedding_unless_untied():
    assert tiny_bert().tokens.tied
    cfg = ModelConfig(name="bert", n_layer=2, n_head=2, d_model=32, max_positions=32, tie_embeddings=False)
    assert not BERT(cfg, 64).tokens.tied


def bert_config(causal=False, policy="none", max_steps=4, **dataset_keys):
    return Config(
        model=ModelConfig(name="bert", n_layer=2, d_model=64, n_head=4, causal=causal),
        dataset=DatasetConfig(block_size=32, vocab_size=512, max_documents=40, **dataset_keys),
        policy=PolicyConfig(name=policy, n_sets=2),
        hardware=HardwareConfig(name="cpu", device="cpu", precision="fp32"),
        train=TrainConfig(max_steps=max_steps, batch_size=8, eval_interval=2, eval_batches=2, checkpoint_interval=0),
        log=LogConfig(progress="lines"),
    )


@pytest.fixture(scope="module")
def bert_data():
    return build_data(bert_config())


def test_bert_trains_on_wordpiece_documents_separated_by_sep(bert_data):
    tokenizer = bert_data.tokenizer
    assert [tokenizer.id_to_token(i) for i in range(5)] == ["[PAD]", "[UNK]", "[CLS]", SEP, MASK]
    assert tokenizer.token_to_id(EOS) is None
    assert (bert_data.train == tokenizer.token_to_id(SEP)).any()
    assert bert_data.masking is not None and "masked-LM" in bert_data.describe()


@pytest.mark.slow
def test_causal_bert_keeps_wordpiece_without_masking():
    data = build_data(bert_config(causal=True))
    assert data.masking is None and data.tokenizer.token_to_id(MASK) is not None


def test_validation_masks_are_the_same_at_every_evaluation(bert_data):
    first, second = list(bert_data.eval_batches("val", 4, 3)), list(bert_data.eval_batches("val", 4, 3))
    assert [b["labels"].tolist() for b in first] == [b["labels"].tolist() for b in second]
    unmasked = list(eval_batches(bert_data.val, 4, 3))
    assert all((b["labels"] == IGNORE_INDEX).any() for b in first)
    assert not torch.equal(first[0]["input_ids"], unmasked[0]["input_ids"])


def test_masked_lm_needs_a_mask_token():
    with pytest.raises(BadInput, match=r"masked-LM needs a \[MASK\] token"):
        MaskedLM.for_tokenizer(train_bpe(["some text to learn from"] * 4, 300))


@pytest.mark.slow
def test_bert_cyclic_run_writes_a_full_summary(tmp_path):
    compose_and_run([
        "model=bert", "dataset=pydoc", "policy=cyclic", "policy.n_sets=2", "model.d_model=64",
        "dataset.block_size=32", "dataset.vocab_size=512", "dataset.max_documents=40", "train.batch_size=8",
        "train.max_steps=4", "train.eval_interval=2", "train.eval_batches=2",
    ], tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["model"] == "bert" and summary["final_map"] == [0, 1, 0, 1]
    assert summary["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]))
