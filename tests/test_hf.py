"""models/hf.py: Hugging Face models built offline from a config.json the test writes (a tiny
Llama, a tiny BERT, a tiny ViT), their cards, batches, losses, overrides and errors."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import pytest

from models import hf

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

LLAMA = {  # grouped-query attention: 4 query heads share 2 key/value heads of 8
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256,
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",  # how the checkpoint was stored: the benchmark builds float32
}
BERT = {
    "architectures": ["BertForMaskedLM"], "model_type": "bert", "vocab_size": 128,
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    "intermediate_size": 64, "max_position_embeddings": 512, "type_vocab_size": 2,
    "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "pad_token_id": 0,
}
VIT = {  # three labels, known only from id2label as in checkpoints on the hub
    "architectures": ["ViTForImageClassification"], "model_type": "vit", "image_size": 32,
    "patch_size": 8, "num_channels": 3, "hidden_size": 32, "num_hidden_layers": 2,
    "num_attention_heads": 2, "intermediate_size": 64,
    "id2label": {"0": "cat", "1": "dog", "2": "bird"},
    "label2id": {"cat": 0, "dog": 1, "bird": 2},
}
CONFIGS = {"llama": LLAMA, "bert": BERT, "vit": VIT}


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No network, and a hub cache of the test's own: nothing may be fetched."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))

    def refuse(*args, **kwargs):
        raise OSError("the network is off in these tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def _write(tmp_path: Path, name: str, settings: dict | str) -> Path:
    directory = tmp_path / name
    directory.mkdir()
    text = settings if isinstance(settings, str) else json.dumps(settings, indent=2)
    (directory / "config.json").write_text(text)
    return directory


def _cfg(tmp_path: Path, name: str, *overrides: str) -> hf.Config:
    directory = _write(tmp_path, name, CONFIGS[name])
    return hf.config(hf.parse(":".join([f"hf:{directory}", *overrides])))


def _layers(model):
    """The transformer blocks of each tiny model."""
    base = getattr(model, "model", None) or getattr(model, "bert", None) or model.vit
    return base.layers if hasattr(base, "layers") else base.encoder.layer


@pytest.mark.parametrize(("name", "expected"), [
    ("llama", {"task": "causal-lm", "unit": "sequence", "size_arg": "seq_len",
               "default_size": 64, "max_size": 64, "architecture": "LlamaForCausalLM"}),
    ("bert", {"task": "masked-lm", "unit": "sequence", "size_arg": "seq_len",
              "default_size": 128, "max_size": 512, "architecture": "BertForMaskedLM"}),
    ("vit", {"task": "image-classification", "unit": "image", "size_arg": "image_size",
             "default_size": 32, "max_size": None, "architecture": "ViTForImageClassification"}),
])
def test_card_reads_the_task_and_sizes_from_config_json(tmp_path, name, expected):
    card = _cfg(tmp_path, name).card
    assert {k: card[k] for k in expected} == expected
    assert card["default_batch_size"] == 8
    assert len(card["config_sha256"]) == 64 and int(card["config_sha256"], 16) >= 0


def test_the_config_hash_follows_the_config_text_and_the_overrides(tmp_path):
    directory = _write(tmp_path, "llama", LLAMA)
    plain = hf.card(hf.parse(f"hf:{directory}"))["config_sha256"]
    assert hf.card(hf.parse(f"hf:{directory}"))["config_sha256"] == plain
    fewer = hf.card(hf.parse(f"hf:{directory}:num_hidden_layers=1"))["config_sha256"]
    assert fewer != plain
    # The same value written another way is the same config.
    assert hf.card(hf.parse(f"hf:{directory}:num_hidden_layers=01"))["config_sha256"] == fewer
    (directory / "config.json").write_text(json.dumps({**LLAMA, "vocab_size": 512}))
    assert hf.card(hf.parse(f"hf:{directory}"))["config_sha256"] != plain


@pytest.mark.parametrize("name", ["llama", "bert", "vit"])
def test_build_gives_the_architecture_with_random_float32_weights(tmp_path, name):
    cfg = _cfg(tmp_path, name)
    torch.manual_seed(0)
    model = hf.build(cfg)
    assert type(model).__name__ == CONFIGS[name]["architectures"][0]
    assert len(_layers(model)) == 2
    assert model.config._attn_implementation == "sdpa"
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    torch.manual_seed(0)
    same = hf.build(cfg)
    torch.manual_seed(1)
    other = hf.build(cfg)
    weights = [dict(m.named_parameters()) for m in (model, same, other)]
    assert all(torch.equal(p, weights[1][k]) for k, p in weights[0].items())
    assert not all(torch.equal(p, weights[2][k]) for k, p in weights[0].items())
    assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["config.json"]


def test_the_llama_shares_key_value_heads(tmp_path):
    attention = _layers(hf.build(_cfg(tmp_path, "llama")))[0].self_attn
    assert attention.q_proj.out_features == 32 and attention.k_proj.out_features == 16


def _batches(cfg, size, seed):
    return [hf.make_batch(cfg, 3, size, torch.Generator().manual_seed(seed)) for _ in range(2)]


def test_a_causal_lm_batch_is_token_ids_that_are_also_the_targets(tmp_path):
    cfg = _cfg(tmp_path, "llama")
    (inputs, targets), (again, _) = _batches(cfg, 16, seed=0)
    assert inputs.shape == targets.shape == (3, 16) and inputs.dtype == torch.long
    assert inputs.min() >= 0 and inputs.max() < 256
    assert torch.equal(inputs, targets)  # transformers shifts the labels itself
    assert torch.equal(inputs, again)
    assert not torch.equal(inputs, _batches(cfg, 16, seed=1)[0][0])


def test_a_masked_lm_batch_masks_fifteen_percent_of_each_row(tmp_path):
    cfg = _cfg(tmp_path, "bert")
    (inputs, targets), (again, again_targets) = _batches(cfg, 20, seed=0)
    assert inputs.shape == targets.shape == (3, 20) and inputs.dtype == torch.long
    assert inputs.min() >= 0 and inputs.max() < 128
    masked = targets != -100
    assert masked.sum(dim=1).tolist() == [3, 3, 3]  # round(0.15 * 20) in every row
    assert torch.equal(inputs[masked], targets[masked])  # this config names no mask token
    assert torch.equal(inputs, again) and torch.equal(targets, again_targets)
    assert not torch.equal(masked, _batches(cfg, 20, seed=1)[0][1] != -100)


def test_a_masked_lm_batch_puts_the_mask_token_where_the_config_names_one(tmp_path):
    directory = _write(tmp_path, "bert", {**BERT, "mask_token_id": 4})
    cfg = hf.config(hf.parse(f"hf:{directory}"))
    inputs, targets = hf.make_batch(cfg, 2, 4, torch.Generator().manual_seed(0))
    masked = targets != -100
    assert masked.sum(dim=1).tolist() == [1, 1]  # at least one position, even in a short row
    assert (inputs[masked] == 4).all()


def test_an_image_batch_is_pixels_of_the_size_and_labels_of_the_config(tmp_path):
    cfg = _cfg(tmp_path, "vit")
    (pixels, labels), (again, again_labels) = _batches(cfg, 32, seed=0)
    assert pixels.shape == (3, 3, 32, 32) and pixels.dtype == torch.float32
    assert labels.shape == (3,) and labels.dtype == torch.long
    assert labels.min() >= 0 and labels.max() < 3
    assert torch.equal(pixels, again) and torch.equal(labels, again_labels)
    assert hf.make_batch(cfg, 1, 48, torch.Generator())[0].shape == (1, 3, 48, 48)


@pytest.mark.parametrize(("name", "num_classes"), [("llama", 256), ("bert", 128), ("vit", 3)])
def test_the_loss_is_the_cross_entropy_of_a_fresh_model_and_trains_every_weight(
        tmp_path, name, num_classes):
    cfg = _cfg(tmp_path, name)
    torch.manual_seed(0)
    model = hf.build(cfg)
    inputs, targets = hf.make_batch(cfg, 2, cfg.card["default_size"] // 2 if name != "vit"
                                    else 32, torch.Generator().manual_seed(0))
    loss = hf.loss(model, inputs, targets)
    assert loss.shape == () and torch.isfinite(loss)
    # Small random weights predict every class alike: the loss is near ln(classes).
    assert abs(loss.item() - math.log(num_classes)) < 0.5
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_a_vit_takes_another_image_size_by_interpolating_its_positions(tmp_path):
    cfg = _cfg(tmp_path, "vit")
    model = hf.build(cfg)
    pixels, labels = hf.make_batch(cfg, 2, 48, torch.Generator().manual_seed(0))
    assert torch.isfinite(hf.loss(model, pixels, labels))


def test_overrides_change_the_built_model(tmp_path):
    fewer = _cfg(tmp_path, "llama", "num_hidden_layers=1", "rms_norm_eps=1e-5",
                 "tie_word_embeddings=true")
    model = hf.build(fewer)
    assert len(_layers(model)) == 1 and model.config.num_hidden_layers == 1
    assert model.config.rms_norm_eps == 1e-5
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_an_override_is_applied_before_the_config_derives_fields_from_it(tmp_path):
    # head_dim is hidden_size // num_attention_heads, worked out when the config is made
    wider = hf.build(_cfg(tmp_path, "llama", "hidden_size=64"))
    attention = _layers(wider)[0].self_attn
    assert attention.head_dim == 16 and attention.k_proj.out_features == 32


def test_a_float_override_reaches_the_modules(tmp_path):
    model = hf.build(_cfg(tmp_path, "bert", "hidden_dropout_prob=0.0"))
    assert model.bert.embeddings.dropout.p == 0.0


def test_fewer_layers_keep_a_config_with_a_type_per_layer_valid(tmp_path):
    qwen = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 128,
            "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 64,
            "max_position_embeddings": 256, "layer_types": ["full_attention"] * 2}
    directory = _write(tmp_path, "qwen", qwen)
    for num_layers in (1, 3):
        model = hf.build(hf.config(hf.parse(f"hf:{directory}:num_hidden_layers={num_layers}")))
        assert len(model.model.layers) == num_layers


@pytest.mark.parametrize(("override", "message"), [
    ("num_layers=1", "unknown override 'num_layers'"),
    ("num_hidden_layers=two", "num_hidden_layers='two' is not an integer"),
    ("num_hidden_layers=1.5", "num_hidden_layers='1.5' is not an integer"),
    ("rms_norm_eps=small", "rms_norm_eps='small' is not a number"),
    ("tie_word_embeddings=maybe", "tie_word_embeddings='maybe' is not true or false"),
])
def test_a_bad_override_is_one_line_naming_the_key(tmp_path, override, message):
    with pytest.raises(ValueError, match=message) as caught:
        _cfg(tmp_path, "llama", override)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("text", [
    "hf:models/tiny", "hf:/abs/dir:num_hidden_layers=1",
    "hf:org/name:rms_norm_eps=1e-5:tie_word_embeddings=false", "hf:x:name=",
])
def test_parse_round_trips_the_name(text):
    assert hf.parse(text).name == text


def test_parse_keeps_the_overrides_in_order_as_text():
    ref = hf.parse("hf:d:num_hidden_layers=1:rms_norm_eps=1e-5")
    assert ref == hf.Reference("d", (("num_hidden_layers", "1"), ("rms_norm_eps", "1e-5")))


@pytest.mark.parametrize(("text", "message"), [
    ("gpt2-tiny", "must start with 'hf:'"),
    ("hf:", "names no directory"),
    ("hf:d:num_hidden_layers", "is not KEY=VALUE"),
    ("hf:d:=2", "is not KEY=VALUE"),
    ("hf:d:a=1:a=2", "'a' is given twice"),
])
def test_parse_rejects_bad_syntax_in_one_line(text, message):
    with pytest.raises(ValueError, match=message) as caught:
        hf.parse(text)
    assert "\n" not in str(caught.value)


def _card_error(text: str) -> str:
    with pytest.raises(ValueError) as caught:
        hf.card(hf.parse(text))
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_card_errors_name_the_path_and_the_problem(tmp_path):
    assert "no such directory ./absent" in _card_error("hf:./absent")
    assert "neither a directory nor a hub model cached" in _card_error("hf:org/absent")
    (tmp_path / "empty").mkdir()
    assert f"{tmp_path / 'empty' / 'config.json'} does not exist" in _card_error(
        f"hf:{tmp_path / 'empty'}")
    bad = _write(tmp_path, "bad", "{not json")
    assert f"cannot read {bad / 'config.json'}" in _card_error(f"hf:{bad}")
    array = _write(tmp_path, "array", "[1, 2]")
    assert "holds no JSON object" in _card_error(f"hf:{array}")
    bare = _write(tmp_path, "bare", {k: v for k, v in BERT.items() if k != "architectures"})
    assert f"{bare / 'config.json'} has no `architectures`" in _card_error(f"hf:{bare}")
    t5 = _write(tmp_path, "t5", {"architectures": ["T5ForConditionalGeneration"]})
    message = _card_error(f"hf:{t5}")
    assert "T5ForConditionalGeneration" in message and str(t5 / "config.json") in message


@pytest.mark.parametrize(("architecture", "task"), [
    ("GPT2LMHeadModel", "causal-lm"), ("MistralForCausalLM", "causal-lm"),
    ("RobertaForMaskedLM", "masked-lm"), ("ResNetForImageClassification", "image-classification"),
    ("T5WithLMHeadModel", None), ("BertForSequenceClassification", None),
])
def test_the_task_follows_the_architecture(tmp_path, architecture, task):
    directory = _write(tmp_path, "m", {"architectures": [architecture], "n_positions": 1024})
    ref = hf.parse(f"hf:{directory}")
    if task is None:
        assert "not a causal LM, masked LM or image classifier" in _card_error(ref.name)
        return
    card = hf.card(ref)
    assert card["task"] == task
    if task == "causal-lm":  # GPT-2 names its context n_positions
        assert (card["max_size"], card["default_size"]) == (1024, 128)
    if task == "image-classification":  # a ConvNet's config names no image size
        assert card["default_size"] == 224


def _cache(root: Path, repo: str, settings: dict) -> None:
    """A hub model in huggingface_hub's cache layout, as `hf download` leaves it."""
    model = root / ("models--" + repo.replace("/", "--"))
    (model / "refs").mkdir(parents=True)
    (model / "refs" / "main").write_text("0123abcd")
    snapshot = model / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(settings))


def test_a_hub_name_is_read_from_the_local_cache(tmp_path, monkeypatch):
    _cache(tmp_path / "hub-cache", "tiny-org/tiny-vit", VIT)
    cfg = hf.config(hf.parse("hf:tiny-org/tiny-vit:num_hidden_layers=1"))
    assert cfg.card["task"] == "image-classification"
    assert len(_layers(hf.build(cfg))) == 1
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    _cache(tmp_path / "home" / "hub", "tiny-org/tiny-bert", BERT)
    assert hf.card(hf.parse("hf:tiny-org/tiny-bert"))["task"] == "masked-lm"
    assert "hf download tiny-org/tiny-vit config.json" in _card_error("hf:tiny-org/tiny-vit")


def test_card_needs_no_transformers_and_build_names_the_extra(tmp_path, run_python):
    directory = _write(tmp_path, "llama", LLAMA)
    run_python(f"""
import sys
sys.modules["transformers"] = None  # import transformers now raises ImportError
from models import hf
cfg = hf.config(hf.parse("hf:{directory}:num_hidden_layers=1"))
assert cfg.card["task"] == "causal-lm", cfg.card
assert "torch" not in sys.modules, "card() imported torch"
try:
    hf.build(cfg)
except ImportError as exc:
    assert str(exc) == "transformers is not installed: pip install -e '.[hf]'", exc
else:
    raise AssertionError("build() without transformers did not raise")
""")


def test_synthetic_batches_are_learnable(tmp_path):
    # Tokens: each next one is the last plus one of the four fixed steps (mod the vocabulary);
    # images: each class's fixed pattern under unit noise, so a class's mean image stands out.
    import torch

    ids, _ = hf.make_batch(_cfg(tmp_path, "llama"), 8, 32, torch.Generator().manual_seed(0))
    vocab = LLAMA["vocab_size"]
    steps = {s % vocab for s in hf._SUCCESSOR_STEPS}
    assert {int(d) for d in (ids[:, 1:] - ids[:, :-1]).remainder(vocab).flatten()} == steps
    pixels, labels = hf.make_batch(_cfg(tmp_path, "vit"), 256, 32,
                                   torch.Generator().manual_seed(0))
    means = torch.stack([pixels[labels == k].mean(0) for k in range(3)])
    assert (means[0] - means[1]).abs().mean() > 0.5  # patterns ~N(0, 1): the classes differ
