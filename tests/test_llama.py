"""model=llama against transformers' LlamaForCausalLM and Qwen3ForCausalLM on small random models built locally:
the block itself, Hugging Face import (from_hf, train.init_from), export (to_hf, tyingrun-export and its self-check),
the configs it refuses, policy=recursive's conversion of a Llama, FLOPs per token and a short run of every policy."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tyingrun import export
from tyingrun.config import ModelConfig, check
from tyingrun.data.tokenizer import EOS, train_bpe
from tyingrun.errors import BadInput
from tyingrun.models import hf_llama
from tyingrun.models.hf_llama import from_hf, read_hf_config, to_hf
from tyingrun.models.llama import Llama
from tyingrun.policies import POLICIES
from tyingrun.run import build_model
from tyingrun.train import recursive
from tyingrun.train.init_from import init_from
from tyingrun.tying import counts, maps
from tyingrun.tying.flops import train_flops_per_token

from .helpers import TINY_RUN, counted_flops_per_token, run_folder, small_lm_config

transformers = pytest.importorskip("transformers")

VOCAB = 100
# Hidden configurations: (transformers class name, its config keys). Grouped-query ratios 4, 1 and 2; the Qwen3 has
# head_dim 24, not hidden_size / heads = 16, and QK-norm.
HF_CONFIGS = {
    "llama-gqa4-tied": ("LlamaForCausalLM", dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                                                 tie_word_embeddings=True)),
    "llama-mha-untied-biases": ("LlamaForCausalLM", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                                                         tie_word_embeddings=False, attention_bias=True,
                                                         mlp_bias=True)),
    "llama-gqa2-untied": ("LlamaForCausalLM", dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=3,
                                                   tie_word_embeddings=False)),
    "qwen3-head_dim24-gqa2": ("Qwen3ForCausalLM", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                       head_dim=24, tie_word_embeddings=True)),
}
PARITY = 1e-4  # max abs logit difference in fp32 (issue 29)


def perturb(model, seed=3):
    """Move every weight off its init (unit norm gains, zero biases) so that a misplaced tensor shows in the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in counts.unique_parameters(model.parameters()).values():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def hf_model(name, n_layer=3, vocab=VOCAB, **overrides):
    kind, keys = HF_CONFIGS[name]
    config_class = transformers.LlamaConfig if kind == "LlamaForCausalLM" else transformers.Qwen3Config
    config = config_class(num_hidden_layers=n_layer, intermediate_size=96, vocab_size=vocab, rope_theta=500.0,
                          rms_norm_eps=1e-5, **{**keys, **overrides})
    torch.manual_seed(0)
    return perturb(getattr(transformers, kind)(config)).eval()


def tokens(length=40, vocab=VOCAB):
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def max_diff(ours, theirs, ids):
    theirs_logits = theirs(ids).logits if hasattr(theirs, "config") else theirs(ids)
    return (ours.eval()(ids) - theirs_logits).abs().max().item()


@pytest.mark.parametrize("name", HF_CONFIGS)
def test_the_block_gives_the_hugging_face_logits(tmp_path, name):
    hf = hf_model(name)
    hf.save_pretrained(tmp_path)
    model = from_hf(tmp_path)
    assert model.tokens.tied == hf.config.tie_word_embeddings
    assert max_diff(model, hf, tokens()) <= PARITY


@pytest.mark.parametrize("name", HF_CONFIGS)
def test_init_from_a_saved_folder_gives_the_hugging_face_logits(tmp_path, name):
    hf = hf_model(name)
    hf.save_pretrained(tmp_path)
    cfg = read_hf_config(tmp_path)
    torch.manual_seed(5)
    model = Llama(cfg, cfg.vocab_size)
    assert max_diff(model, hf, tokens()) > 0.1  # a fresh init is far off
    init_from(model, tmp_path)
    assert max_diff(model, hf, tokens()) <= PARITY


def test_the_rotation_is_the_rotate_half_layout(tmp_path):
    """A wrong RoPE base, or QK-norm left out, moves the logits far beyond the tolerance."""
    hf = hf_model("qwen3-head_dim24-gqa2")
    hf.save_pretrained(tmp_path)
    model = from_hf(tmp_path)
    model.cfg.rope_theta = 10000.0
    assert max_diff(model, hf, tokens()) > 100 * PARITY


def test_a_tied_source_starts_an_untied_model_with_a_copy_of_the_embedding(tmp_path):
    hf = hf_model("llama-gqa4-tied")
    hf.save_pretrained(tmp_path)
    cfg = read_hf_config(tmp_path)
    model = Llama(ModelConfig(**{**vars(cfg), "tie_embeddings": False}), cfg.vocab_size)
    init_from(model, tmp_path)
    assert not model.tokens.tied and max_diff(model, hf, tokens()) <= PARITY


def test_a_folder_of_another_shape_names_every_key_to_set(tmp_path):
    hf_model("qwen3-head_dim24-gqa2").save_pretrained(tmp_path)
    model = Llama(ModelConfig(name="llama", n_layer=3, d_model=64, n_head=4), VOCAB)
    with pytest.raises(BadInput) as err:
        init_from(model, tmp_path)
    assert str(err.value) == (f"train.init_from={tmp_path} is a Llama of another shape; set model.n_kv_head=2 "
                              f"model.head_dim=24 model.d_ff=96 model.rope_theta=500.0 model.qk_norm=true")


def test_a_folder_of_another_vocabulary_points_to_the_model_s_tokenizer(tmp_path):
    hf_model("llama-gqa4-tied").save_pretrained(tmp_path)
    cfg = read_hf_config(tmp_path)
    with pytest.raises(BadInput) as err:
        init_from(Llama(cfg, 4096), tmp_path)
    assert str(err.value).endswith("set model.vocab_size=100, and dataset.tokenizer=from_model for the model's own "
                                   "vocabulary")


@pytest.mark.parametrize("key, value", [
    ("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    ("rope_scaling", {"type": "dynamic", "factor": 2.0}),
    ("use_sliding_window", True),
    ("num_experts", 8),
    ("hidden_act", "gelu"),
    ("model_type", "qwen3_moe"),
    ("layer_types", ["full_attention", "sliding_attention"]),
])
def test_a_config_the_block_cannot_compute_is_one_line_naming_the_key(tmp_path, key, value):
    hf_model("llama-gqa4-tied").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    if key == "rope_scaling":
        config.pop("rope_parameters")
    config[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(BadInput) as err:
        read_hf_config(tmp_path)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'config.json'}: {key}=") and "\n" not in message
    assert "is not implemented by tyingrun's Llama block" in message


def test_a_window_size_that_no_layer_uses_is_accepted(tmp_path):
    hf = hf_model("qwen3-head_dim24-gqa2")
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "sliding_window": 4096, "use_sliding_window": False}))
    assert max_diff(from_hf(tmp_path), hf, tokens()) <= PARITY


@pytest.mark.parametrize("tie, qk_norm", [(True, False), (False, False), (True, True)])
def test_to_hf_of_a_cyclic_model_loads_in_transformers_with_the_same_logits(tmp_path, tie, qk_norm):
    cfg = ModelConfig(name="llama", n_layer=4, d_model=32, n_head=4, n_kv_head=2, head_dim=12 if qk_norm else None,
                      d_ff=48, qk_norm=qk_norm, tie_embeddings=tie)
    torch.manual_seed(0)
    model = Llama(cfg, VOCAB)
    model.stack.apply_map(maps.cyclic(4, 2))
    perturb(model)
    to_hf(model, tmp_path)
    hf, loading = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(hf).__name__ == ("Qwen3ForCausalLM" if qk_norm else "LlamaForCausalLM")
    assert not any(loading.values()), loading  # no missing, unexpected or mismatched tensor
    assert hf.config.tie_word_embeddings == tie and hf.config.num_hidden_layers == 4
    assert max_diff(model, hf.eval(), tokens()) <= PARITY


@pytest.mark.parametrize("preset, heads, kv_heads, head_dim, d_ff, tied", [
    ("llama_smollm2_135m", 9, 3, 64, 1536, True), ("qwen3_0_6b", 16, 8, 128, 3072, True),
    ("tinyllama_1_1b", 32, 4, 64, 5632, False),
])
def test_the_presets_pass_the_checks_and_build_their_attention(preset, heads, kv_heads, head_dim, d_ff, tied):
    keys = yaml.safe_load((Path(__file__).parent.parent / "conf" / "model" / f"{preset}.yaml").read_text())
    cfg = small_lm_config()
    cfg.model = ModelConfig(**keys)
    check(cfg)
    block = Llama(ModelConfig(**{**keys, "n_layer": 1, "vocab_size": 8}), 8).stack.blocks[0]
    attention = block.self_attn
    assert (attention.n_head, attention.n_kv_head, attention.head_dim, block.mlp.up_proj.out_features) == (
        heads, kv_heads, head_dim, d_ff)
    assert hasattr(attention, "q_norm") == (preset == "qwen3_0_6b") and ModelConfig(**keys).tie_embeddings == tied


def test_the_policy_test_below_names_every_policy():
    assert sorted(POLICIES) == sorted(EVERY_POLICY)


@pytest.mark.parametrize("keys, expected", [
    ({"n_kv_head": 3}, "model.n_kv_head=3 does not divide model.n_head=4"),
    ({"head_dim": 7}, "model.head_dim=7 is odd"),
    ({"name": "gpt2", "n_kv_head": 2}, "model.n_kv_head is a key of model=llama; model=gpt2 does not use it"),
    ({"name": "gpt2", "rope_theta": 500.0}, "model.rope_theta is a key of model=llama"),
])
def test_bad_llama_keys_are_one_clear_message(keys, expected):
    with pytest.raises(BadInput) as err:
        check(small_lm_config(model_keys={"name": "llama", **keys}))
    assert expected in str(err.value)


@pytest.mark.parametrize("share, grad", [("block", "shared"), ("attention", "shared"), ("mlp", "frozen_copy")])
def test_train_flops_per_token_agrees_with_a_counted_step(share, grad):
    cfg = ModelConfig(name="llama", n_layer=4, d_model=32, n_head=4, n_kv_head=2, head_dim=12, d_ff=48, qk_norm=True)
    torch.manual_seed(0)
    model = Llama(cfg, 64, grad)
    model.stack.set_sharing(share, False)
    model.stack.apply_map(maps.cyclic(4, 2))
    counted = counted_flops_per_token(model)
    assert train_flops_per_token(model, 32, batch_size=2) == pytest.approx(counted, rel=0.05)


# A Hugging Face folder of the CLI's tiny llama (TINY_RUN: 4 layers of width 64; conf/model/llama.yaml: 4 heads over 2
# key/value heads, MLP 384) with a tokenizer.json of its own, as a converted SmolLM2 would come.
TINY_LLAMA = dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=384, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf-llama")
    words = "the quick brown fox jumps over a lazy dog while tying layers of transformers in loops".split()
    documents = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 4
    tokenizer = train_bpe(documents, 300)
    assert tokenizer.token_to_id(EOS) is not None
    tokenizer.save(str(folder / "tokenizer.json"))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tokenizer.get_vocab_size(), **TINY_LLAMA)
    perturb(transformers.LlamaForCausalLM(config)).save_pretrained(folder)
    return folder


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
def test_a_saved_llama_converts_with_its_own_tokenizer_and_full_rank_lora_reproduces_it(cli, tmp_path, hf_folder):
    run_dir = tmp_path / "recursive"
    cli(*TINY_RUN, "model=llama", f"train.init_from={hf_folder}", "dataset.tokenizer=from_model", "policy=recursive",
        "policy.pattern=middle_cycle", "policy.n_sets=1", "policy.lora_rank=64", "train.max_steps=2",
        "train.eval_batches=2", "hardware=cpu", f"hydra.run.dir={run_dir}", expect=0)
    result = summary(run_dir)
    assert result["converted_val_loss"] == pytest.approx(result["source_val_loss"], abs=1e-4)
    assert result["converted_test_loss"] == pytest.approx(result["source_test_loss"], abs=1e-4)
    # The trained recursive model exports as a plain Llama (LoRA merged, ties copied) that checks itself.
    exported = cli(str(run_dir), str(tmp_path / "hf"), entry=("-m", "tyingrun.export"), expect=0)
    assert ("(Llama, 4 layers, tie_word_embeddings=True); reloaded with transformers' LlamaForCausalLM"
            in exported.stdout)


@pytest.mark.slow
def test_the_data_tool_shows_the_splits_under_the_model_s_tokenizer(cli, tmp_path, hf_folder):
    shown = cli("model=llama", f"train.init_from={hf_folder}", "dataset.tokenizer=from_model", "--dump",
                str(tmp_path / "dump"), entry=("-m", "tyingrun.data_cli"), expect=0)
    bpe = cli("model=llama", entry=("-m", "tyingrun.data_cli"), expect=0)
    # The same documents in more tokens: the model's 300-token vocabulary against the default 4096 trained on pydoc.
    tokens_in = [int(line.split(" tokens")[0].split()[-1].replace(",", "")) for line in shown.stdout.splitlines()]
    default = [int(line.split(" tokens")[0].split()[-1].replace(",", "")) for line in bpe.stdout.splitlines()]
    assert len(tokens_in) == 3 and all(ours > 1.5 * theirs for ours, theirs in zip(tokens_in, default, strict=True))
    assert (tmp_path / "dump" / "train.txt").is_file()


def test_full_rank_recursive_conversion_reproduces_the_source_logits(hf_folder):
    cfg = small_lm_config(policy="recursive", policy_keys={"pattern": "cycle", "n_sets": 2, "lora_rank": 64})
    source = read_hf_config(hf_folder)
    model = build_model(ModelConfig(**{**vars(source), "max_positions": 64}), None, "shared", "matrices")
    recursive.prepare(model, cfg.policy)
    _, original = recursive.convert(model, hf_folder, cfg.policy)
    assert model.stack.src == [0, 1, 0, 1] and model.stack.independent_layers == 2
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_folder).eval()
    ids = tokens(vocab=source.vocab_size)
    assert max_diff(original, hf, ids) <= PARITY
    assert max_diff(model, hf, ids) <= PARITY  # W + B A from a full-rank SVD of the differences


@pytest.fixture(scope="module")
def llama_runs(tmp_path_factory, data_cache):
    """Two finished 4-step llama runs on pydoc, cyclic over 2 sets: tied and untied embeddings."""
    made = {}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TYINGRUN_CACHE", str(data_cache))
        for tie in (True, False):
            folder = tmp_path_factory.mktemp(f"llama-tie{tie}") / "run"
            cfg = small_lm_config("cyclic", 4, model_keys={"name": "llama", "n_kv_head": 2, "d_ff": 96,
                                                           "tie_embeddings": tie})
            folder.mkdir()
            run_folder(cfg, folder)
            made[tie] = folder
    return made


@pytest.mark.slow
@pytest.mark.parametrize("tie", [True, False])
def test_an_exported_run_loads_in_transformers_with_the_run_logits(llama_runs, tmp_path, tie, capsys):
    out = tmp_path / "hf"
    export.main([str(llama_runs[tie]), str(out)])
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote {out} (Llama, 4 layers, tie_word_embeddings={tie}); reloaded with "
                              f"transformers' LlamaForCausalLM")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "tokenizer.json"]
    readme = (out / "README.md").read_text()
    assert "written here as a copy" in readme and "[0, 1, 0, 1]" in readme
    model = export.load_run_model(llama_runs[tie])
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.config.tie_word_embeddings == tie
    assert max_diff(model, hf, tokens(vocab=hf.config.vocab_size)) <= PARITY


@pytest.mark.slow
def test_an_export_that_does_not_reproduce_the_run_is_refused_and_leaves_no_folder(llama_runs, tmp_path, monkeypatch,
                                                                                   capsys):
    written = hf_llama.hf_weights

    def corrupted(model):
        weights = written(model)
        weights["model.layers.2.mlp.down_proj.weight"] += 0.5  # a tied slot's copy, as MobileLLM#16's went wrong
        return weights

    monkeypatch.setattr(hf_llama, "hf_weights", corrupted)
    out = tmp_path / "hf"
    with pytest.raises(SystemExit) as stop:
        export.main([str(llama_runs[True]), str(out)])
    assert stop.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tyingrun-export: error: the written folder does not reproduce")
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_hugging_face_llama_in_the_cache_starts_a_run_offline(cli, tmp_path, hf_folder):
    hub = tmp_path / "hub" / "models--someone--tiny-llama"
    commit = "0" * 40
    snapshot = hub / "snapshots" / commit
    snapshot.parent.mkdir(parents=True)
    shutil.copytree(hf_folder, snapshot)
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text(commit)
    run_dir = tmp_path / "run"
    cli(*TINY_RUN, "model=llama", "train.init_from=hf:someone/tiny-llama", "dataset.tokenizer=from_model",
        "policy=cyclic", "train.max_steps=2", "train.eval_batches=2", "hardware=cpu", f"hydra.run.dir={run_dir}",
        env={"HF_HUB_CACHE": str(tmp_path / "hub")}, expect=0)
    assert summary(run_dir)["model"] == "llama"
    missing = cli(*TINY_RUN, "model=llama", "train.init_from=hf:someone/absent", f"hydra.run.dir={tmp_path / 'x'}",
                  env={"HF_HUB_CACHE": str(tmp_path / "hub")})
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        "tyingrun: error: train.init_from=hf:someone/absent: someone/absent is not in the Hugging Face cache and the "
        "hub cannot be reached; run once with internet (or huggingface-cli download someone/absent) to cache it"]


@pytest.mark.slow
def test_a_folder_asking_for_rope_scaling_exits_2_with_one_line_before_any_data(cli, tmp_path, hf_folder):
    folder = tmp_path / "scaled"
    shutil.copytree(hf_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(config))
    result = cli(*TINY_RUN, "model=llama", f"train.init_from={folder}", "dataset.tokenizer=from_model",
                 "dataset=text_files", "dataset.files=[/nonexistent.txt]", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"tyingrun: error: {folder / 'config.json'}: rope_parameters={json.dumps(config['rope_parameters'])} is not "
        f"implemented by tyingrun's Llama block (it needs no rope scaling: rope_type \"default\")"]


EVERY_POLICY = ["none", "sequential", "cyclic", "cycle_rev", "middle_cycle", "middle_sequence", "random", "dynamic_q",
                "bandit", "from_file", "recursive", "looped"]


@pytest.mark.slow
@pytest.mark.parametrize("policy, keys", [
    ("none", {}),
    ("sequential", {}),
    ("cyclic", {"share": "attention"}),
    ("cycle_rev", {"share": "mlp", "share_norms": True}),
    ("middle_cycle", {"grad": "frozen_copy"}),
    ("middle_sequence", {"n_sets": 1}),
    ("random", {}),
    ("dynamic_q", {"steps_per_decision": 1}),
    ("bandit", {"steps_per_decision": 1}),
    ("from_file", {"map": [0, 0, 2, 2]}),
    ("looped", {"loop_params": "adaln", "train_loops": "poisson"}),
])
def test_every_policy_trains_model_llama(tmp_path, policy, keys):
    cfg = small_lm_config(policy, 4, model_keys={"name": "llama", "n_kv_head": 2, "d_ff": 96}, policy_keys=keys)
    result = run_folder(cfg, tmp_path)
    assert result["steps"] == 4 and 0 < result["val_loss"] < 20
    assert result["train_flops_per_token"] > 0 and result["peak_tensor_bytes"] > result["peak_state_bytes"] > 0
